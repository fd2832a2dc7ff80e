"""Every size, count and timeout pymailsrv enforces, each with where it comes from.

These are the defaults; the ones a site may want to change are also settings
(see ``config.py``), which start from the values here. Keeping them in one
module means a reader can check each number against its RFC in one sitting.
"""

# --- POP3 -----------------------------------------------------------------

# RFC 2449 §4: "The maximum length of a command is increased from 47
# characters (4 character command, single space, 40 character argument,
# CRLF) to 255 octets, including the terminating CRLF."
POP3_COMMAND_LINE_MAX = 255

# RFC 1939 §3: "A POP3 server MAY have an inactivity autologout timer. Such a
# timer MUST be of at least 10 minutes' duration."
POP3_AUTOLOGOUT_SECONDS = 10 * 60

# Dovecot's choice (login_delay / auth_failure_delay): a failed login is
# answered after 2 seconds, so a password cannot be guessed at line rate.
POP3_FAILED_LOGIN_DELAY_SECONDS = 2.0

# Dovecot's limits: pop3-login closes after 3 bad commands (CLIENT_MAX_BAD_
# COMMANDS); the pop3 process allows 20. (Failed logins: see Authentication.)
POP3_MAX_BAD_COMMANDS_BEFORE_LOGIN = 3
POP3_MAX_BAD_COMMANDS_AFTER_LOGIN = 20

# RFC 1939 §7: "The unique-id of a message is an arbitrary server-determined
# string, consisting of one to 70 characters in the range 0x21 to 0x7E".
POP3_UIDL_MAX = 70

# --- Authentication (both protocols) ----------------------------------------

# Dovecot closes a login connection after 3 failed attempts; we do the same,
# in POP3 and SMTP AUTH alike, so one connection cannot try passwords at
# line rate.
AUTH_MAX_FAILURES_PER_CONNECTION = 3
# Across connections, one client address may fail this often in the window
# before its attempts are refused without checking (Postfix's anvil idea).
AUTH_MAX_FAILURES_PER_ADDRESS = 10
AUTH_FAILURE_WINDOW_SECONDS = 5 * 60
# A login from an address whose checks under way could still reach that
# limit waits for them (FailureThrottle): asking again this often, for at
# most this long (a check takes some 50 ms), then answered as refused.
LOGIN_THROTTLE_POLL_SECONDS = 0.02
LOGIN_THROTTLE_WAIT_SECONDS = 10.0
# Dovecot's PENALTY_IPV6_MASK_BITS: the failed-login throttle and the
# per-address connection cap count an IPv6 client by its /48, a site's usual
# allocation, which holds more addresses than any table could follow one by
# one (and one client could take a new one for each connection).
CLIENT_IPV6_PREFIX = 48
# The addresses the failed-login throttle can follow at once (32 octets
# each, 512 KiB in memory the worker processes share), and how many records
# from the one its hash picks an address may take. Only addresses inside
# their window hold a record; with the table far from full, 16 places make
# a crowded neighbourhood very unlikely (the auth.py warning says if one is).
AUTH_THROTTLE_ADDRESSES = 16384
AUTH_THROTTLE_PROBES = 16

# RFC 4954 §4: a SASL response line may be up to 12288 octets (RFC 5034 §4
# lifts POP3's 255-octet limit for AUTH the same way).
SASL_LINE_MAX = 12288

# --- SMTP -----------------------------------------------------------------

# RFC 5321 §4.5.3.1.4: "The maximum total length of a command line including
# the command word and the <CRLF> is 512 octets." RFC 1870 §3 lets SIZE add
# 26 octets to MAIL, RFC 6531 §3.1 item 5 lets SMTPUTF8 add 10: we allow the
# base plus a generous margin for parameters (and UTF-8 paths), to MAIL and
# RCPT only, per session, never grown.
SMTP_COMMAND_LINE_MAX = 512
SMTP_COMMAND_LINE_EXTENSION_ALLOWANCE = 512

# RFC 5321 §4.5.3.1.6: "The maximum total length of a text line including the
# <CRLF> is 1000 octets (not counting the leading dot duplicated for
# transparency)" - 998 characters + CRLF, plus the transparency dot.
SMTP_TEXT_LINE_MAX = 1000 + 1

# RFC 5321 §4.5.3.1.5: "The maximum total length of a reply line including
# the reply code and the <CRLF> is 512 octets." RFC 1939 §3 says the same of
# a POP3 response line ("up to 512 characters long, including the
# terminating CRLF").
REPLY_LINE_MAX = 512

# Postfix's message_size_limit default (10240000 octets).
SMTP_MESSAGE_SIZE_MAX = 10_240_000

# Postfix's smtpd_recipient_limit default; RFC 5321 §4.5.3.1.8 says a server
# MUST accept at least 100 recipients, so the setting is never allowed below.
SMTP_RECIPIENTS_MAX = 1000
SMTP_RECIPIENTS_RFC_MINIMUM = 100

# RFC 5321 §4.5.3.2.7: the server should wait at least 5 minutes for the next
# command; §4.5.3.2.6 (DATA termination): the client waits 10 minutes for the
# reply to the final dot, so we wait as long for each line of the text.
SMTP_COMMAND_TIMEOUT_SECONDS = 5 * 60
SMTP_DATA_TIMEOUT_SECONDS = 10 * 60

# Postfix's smtpd_hard_error_limit default: "the maximal number of errors a
# remote SMTP client is allowed to make without delivering mail". After 20
# the session ends; a message delivered starts the count again.
SMTP_MAX_ERRORS = 20

# sendmail's MaxAliasRecursion default: an alias chain goes at most 10 names
# deep; deeper is taken for a mistake, logged, and that branch goes nowhere.
ALIAS_DEPTH_MAX = 10

# --- Connections (every listener together) ----------------------------------

# One pymailsrv process serves every protocol, one thread and one socket per
# connection, and a few MB of thread stacks each (only touched pages count).
# A connection over the cap is refused by the accepting thread itself, so
# refused connections start no thread at all.
MAX_CONNECTIONS = 500
# The highest it may be set to. Admitting and releasing a connection reads a
# table of this many places shared by the worker processes, so a typo of
# 2,000,000 took 0.4-0.8 s a greeting; at this cap it is a few milliseconds,
# and ten thousand threads are more than one Python process serves well.
MAX_CONNECTIONS_CAP = 10_000
# What a connection holds open: its socket, and a POP3 session's lock file.
# Beside them: the listening sockets, Maildir and queue files, the log. For
# 500 connections that is 1,256, over the usual soft limit of 1,024 (ulimit
# -n) but far under the usual hard one: the server raises its soft limit to
# what max_connections needs (server.py), and warns where it cannot.
FILES_PER_CONNECTION = 2
FILES_BESIDES_CONNECTIONS = 256
# Out of descriptors all the same (a lower hard limit), a listener pauses
# this long between tries rather than spin. Out of descriptors or threads, it
# warns at most once in SHORTAGE_WARNING_SECONDS, not once a connection.
OUT_OF_DESCRIPTORS_PAUSE_SECONDS = 0.1
SHORTAGE_WARNING_SECONDS = 60.0

# Postfix's anvil: smtpd_client_connection_count_limit defaults to 50 ("1/2
# of the default process limit"), so one client address cannot take more than
# a tenth of the server here. Counted across all listeners, as the threads
# and file descriptors a client holds are the process's, whatever the port.
MAX_CONNECTIONS_PER_ADDRESS = 50

# Worker processes ('start --processes', workers.py). Each is a whole Python
# process (about 25 MB of RSS, most of it shared with the main process it
# was forked from); more of them than CPU cores only costs memory, as the
# GIL they work around is per process. The cap stops a typo (1000).
MAX_PROCESSES = 64

# Worker processes share one listening socket, and a new connection wakes
# every one of them. One that already serves more connections than another
# leaves the connection for the other to take (server.Listener.get_request).
# An idle worker takes it within a millisecond; if the other has not taken it
# within ACCEPT_DEFER_SECONDS (a stalled CPU, or a worker hung or being
# replaced), the one ahead takes it after all, and takes connections without
# waiting for ACCEPT_DEFER_PAUSE_SECONDS, so that a worker that does not
# answer delays one greeting, not every one. nginx's accept_mutex_delay, for
# the same turn-taking, is 500 ms.
ACCEPT_DEFER_SECONDS = 0.25
ACCEPT_DEFER_PAUSE_SECONDS = 5.0
# How often the one ahead looks again whether the connection is still there
# and it still leads: each look reads the shared connection table (about
# 40 us) under the lock the other needs to admit the connection it took.
ACCEPT_DEFER_STEP_SECONDS = 0.002

# Dovecot's mail_max_userip_connections default: logged-in POP3 sessions of
# one user from one client address. (Our maildrop lock already allows only
# one POP3 session per user; see ServerContext.pop3_sessions.)
POP3_MAX_SESSIONS_PER_USER_ADDRESS = 10

# --- Transport ------------------------------------------------------------

# How much one recv() asks the kernel for. A bigger buffer means fewer system
# calls on large DATA transfers; the line limits above still bound memory.
RECV_CHUNK = 64 * 1024

# RFC 8446 §6.1: each side sends close_notify before closing its write side
# (OpenSSL clients report a stream cut without one as truncated). How long
# the end of a TLS session may wait for the client's own close_notify; a
# client that has gone, or closed, ends the wait at once.
TLS_CLOSE_NOTIFY_SECONDS = 1.0

# --- Settings ---------------------------------------------------------------

# The longest timeout, delay or lifetime a setting may name: a year, longer
# than any protocol's timer or a queue's lifetime (Postfix caps
# maximal_queue_lifetime at 100 days). Past a few hundred years, sockets and
# threads refuse to wait at all, so a typo there would fail every connection.
LONGEST_WAIT_SECONDS = 365 * 24 * 60 * 60

# --- Maildir --------------------------------------------------------------

# The Maildir specification (cr.yp.to/proto/maildir.html): "A program should
# delete files in tmp that have not been accessed in 36 hours."
MAILDIR_TMP_MAX_AGE_SECONDS = 36 * 60 * 60

# --- Relay: the outbound queue and its delivery workers ----------------------

# Postfix's defaults: minimal_backoff_time 300 s (the first retry comes 5
# minutes after a temporary failure), each later wait doubles up to
# maximal_backoff_time 4000 s (about 67 minutes), and maximal_queue_lifetime
# 5 days: a message still undelivered then is bounced. RFC 5321 §4.5.4.1
# asks for "at least 30 minutes" between retries and "at least 4-5 days"
# before giving up; the doubling starts sooner, for a short outage.
QUEUE_MIN_BACKOFF_SECONDS = 5 * 60
QUEUE_MAX_BACKOFF_SECONDS = 4000
QUEUE_MAX_LIFETIME_SECONDS = 5 * 24 * 60 * 60

# How often the workers look into the queue directory for messages that have
# come due, or that 'pymailsrv queue flush' (another process) made due. A
# message enqueued by this server wakes them at once.
QUEUE_SCAN_INTERVAL_SECONDS = 1.0

# Delivery threads: Postfix's default_process_limit is 100, but a teaching
# server on one machine needs only a few connections out at a time.
RELAY_WORKERS = 4
# At most Postfix's default_process_limit: 500 threads could not all start.
RELAY_WORKERS_MAX = 100

# RFC 5321 §4.5.3.2: the client's timeouts run from 2 minutes (DATA
# initiation) to 10 minutes (the reply to the final dot); smtplib has one
# timeout for every socket operation, so we use the common 5 minutes of the
# greeting, MAIL and RCPT (§4.5.3.2.1-3) ...
SMTP_CLIENT_TIMEOUT_SECONDS = 5 * 60
# ... and §4.5.3.2.6's 10 minutes for DATA and its text: a spurious timeout
# there "would be very wasteful and would typically result in delivery of
# multiple copies of the message".
SMTP_CLIENT_DATA_TIMEOUT_SECONDS = 10 * 60

# RFC 5321 §4.5.3.1.5 limits a reply line to 512 octets, but not how many
# lines a reply may have. What the relay reads of one reply is bounded, or
# a host that sends reply lines without end would fill our memory until
# the timeout; past this it is a broken connection, and the mail is retried.
SMTP_CLIENT_REPLY_MAX = 64 * 1024
# What is kept of a remote reply, as a recipient's diagnostic: it is written
# into the queue, the log, 'queue list' and the sender's bounce. A real
# server says why in a few lines.
SMTP_CLIENT_REPLY_KEPT = 1000

# The loop guard. RFC 5321 §6.3: counting Received: fields is "an effective,
# although rarely optimal, method of detecting loops", and servers "SHOULD
# use a large rejection threshold, normally at least 100". Postfix uses 50
# (hopcount_limit); issue 5 asked for 30, which still leaves room for any
# real path, and 'relay.max_hops' lets a site raise it.
SMTP_MAX_HOPS = 30
