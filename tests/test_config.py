"""Settings: defaults, then the TOML file, then flags; bad input is one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pymailsrv import config, limits
from pymailsrv.config import DEFAULT_ROOT, ConfigError, Settings, config_file, load_settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PYMAILSRV_CONFIG", raising=False)


def write(tmp_path: Path, text: str, name: str = "settings.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_for(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as refusal:
        load_settings(write(tmp_path, text))
    message = str(refusal.value)
    assert "\n" not in message
    return message


def test_defaults_come_from_limits():
    settings = load_settings()
    assert settings == Settings()
    assert settings.root == DEFAULT_ROOT == Path("mailboxes")
    assert (settings.host, settings.pop3.port, settings.smtp.port) == ("127.0.0.1", 1100, 2525)
    assert settings.pop3.command_line_max == limits.POP3_COMMAND_LINE_MAX == 255
    assert settings.pop3.autologout == limits.POP3_AUTOLOGOUT_SECONDS == 600
    assert settings.pop3.failed_login_delay == 2.0
    assert settings.state_dir == Path("mailboxes/.pymailsrv")


def test_file_values_override_defaults_and_flags_override_the_file(tmp_path):
    path = write(tmp_path, 'root = "/srv/mail"\ndomains = ["example.org"]\n'
                           '[pop3]\nport = 110\nautologout = 900\nfailed_login_delay = 1\n')
    settings = load_settings(path)
    assert settings.root == Path("/srv/mail")
    assert settings.domains == ("example.org",)
    assert (settings.pop3.port, settings.pop3.autologout, settings.pop3.failed_login_delay) == (110, 900.0, 1.0)
    assert settings.smtp.port == 2525  # untouched tables keep their defaults
    flagged = load_settings(path, {"root": "/tmp/r", "pop3": {"port": 0, "autologout": None}})
    assert flagged.root == Path("/tmp/r")
    assert flagged.pop3.port == 0
    assert flagged.pop3.autologout == 900.0  # a flag not given (None) does not override


def test_config_file_is_the_flag_then_the_environment_then_the_working_directory(tmp_path, monkeypatch):
    assert config_file(None) is None
    local = write(tmp_path, "", "pymailsrv.toml")
    assert config_file(None) == Path("pymailsrv.toml")
    monkeypatch.setenv("PYMAILSRV_CONFIG", str(tmp_path / "env.toml"))
    assert config_file(None) == tmp_path / "env.toml"
    assert config_file(local) == local


def test_a_working_directory_that_cannot_be_looked_into_has_no_config_file(monkeypatch):
    # 'sudo -u pymailsrv pymailsrv user add ...' from root's home (mode 0700)
    # died with a traceback looking for ./pymailsrv.toml. Root may look
    # anywhere, so a name too long for the system stands in for the refusal.
    monkeypatch.delenv("PYMAILSRV_CONFIG", raising=False)
    monkeypatch.setattr(config, "DEFAULT_CONFIG_FILE", Path("x" * 300) / "pymailsrv.toml")
    assert config_file(None) is None


def test_environment_config_file_is_read(tmp_path, monkeypatch):
    monkeypatch.setenv("PYMAILSRV_CONFIG", str(write(tmp_path, "[pop3]\nport = 1234\n")))
    assert load_settings().pop3.port == 1234


@pytest.mark.parametrize("text, key", [
    ("bogus = 1\n", "'bogus'"),
    ("[pop3]\nautologut = 5\n", "'pop3.autologut'"),
    ("[nosuchtable]\nx = 1\n", "'nosuchtable'"),
])
def test_unknown_key_is_named_with_its_file(tmp_path, text, key):
    assert error_for(tmp_path, text) == f"unknown setting {key} in {str(tmp_path / 'settings.toml')!r}"


def test_a_bad_value_is_blamed_on_the_file_only_where_the_file_gave_it(tmp_path):
    path = write(tmp_path, "[smtp]\nport = 99999\n")
    with pytest.raises(ConfigError, match=rf"^bad value for 'smtp.port' in '{path}': a port is 0-65535"):
        load_settings(path)
    with pytest.raises(ConfigError, match=r"^bad value for 'smtp.port': a port is 0-65535"):
        load_settings(path, {"smtp": {"port": 70000}})  # the flag's value, which overrides the file's


@pytest.mark.parametrize("text, key", [
    ("[pop3]\nport = \"110\"\n", "pop3.port"),
    ("[pop3]\nport = 70000\n", "pop3.port"),
    ("[pop3]\nport = true\n", "pop3.port"),
    ("[pop3]\nautologout = 0\n", "pop3.autologout"),
    ("[pop3]\nfailed_login_delay = -1\n", "pop3.failed_login_delay"),
    ("[pop3]\nautologout = nan\n", "pop3.autologout"),
    ("[pop3]\nautologout = inf\n", "pop3.autologout"),
    ("[smtp]\ncommand_timeout = 1e300\n", "smtp.command_timeout"),
    ("[pop3]\nfailed_login_delay = nan\n", "pop3.failed_login_delay"),
    ("[relay]\nmax_queue_lifetime = inf\n", "relay.max_queue_lifetime"),
    ("[pop3]\ncommand_line_max = 1.5\n", "pop3.command_line_max"),
    ("domains = \"example.org\"\n", "domains"),
    ("pop3 = 5\n", "pop3"),
    ("trace = \"yes\"\n", "trace"),
    ("[smtp]\nbare_newline = \"maybe\"\n", "smtp.bare_newline"),
    pytest.param(f"[relay]\nmin_backoff = 1{'0' * 400}\n", "relay.min_backoff", id="no-float-holds-it"),
    ("domains = []\n", "domains"),
    ("host = \"\"\n", "host"),
    ("root = \"\"\n", "root"),  # not the current directory by accident
    ("domains = [\"\"]\n", "domains"),
    ("domains = [\"a b\"]\n", "domains"),
    ("hostname = \"\"\n", "hostname"),  # it goes into every greeting and Received: line
    ("hostname = \"mail\\r\\nX-Injected: yes\"\n", "hostname"),
    ("[smtp]\npostmaster = \"../x\"\n", "smtp.postmaster"),  # never a user: refused, not warned of
    ("[relay]\nsmarthost_ca_file = \"/no/such/ca.pem\"\n", "relay.smarthost_ca_file"),
    # smtplib sends AUTH data as ASCII: every attempt raised, the password in its text.
    ("[relay]\nsmarthost_password = \"p\u00e4ssw\u00f6rd\"\n", "relay.smarthost_password"),
    # Path.is_file() raised OSError (ENAMETOOLONG): a traceback.
    (f"[relay]\nsmarthost_ca_file = \"/tmp/{'a' * 300}\"\n", "relay.smarthost_ca_file"),
    # A NUL fits in TOML, in no name or path: os.mkdir, bind and getpwnam raised with a traceback.
    ("root = \"mail\\u0000box\"\n", "root"),
    ("host = \"127.0.0.1\\u0000\"\n", "host"),
    ("run_as = \"nobody\\u0000\"\n", "run_as"),
    ("[tls]\ncert = \"a\\u0000\"\n", "tls.cert"),
    ("domains = [\"a\\u0000b\"]\n", "domains[0]"),
    # Port 0 picks a free port to listen on; there is none to connect to.
    ("[relay]\nsmarthost = \"mail.example.net:0\"\n", "relay.smarthost"),
    ("[relay]\nport = 0\n", "relay.port"),
    ("[relay]\ndns_server = \"127.0.0.1:0\"\n", "relay.dns_server"),
    # Accepted, then every MX lookup failed: dnspython takes only an address.
    ("[relay]\ndns_server = \"localhost:53\"\n", "relay.dns_server"),
    # No IDNA codec takes it: bind() raised TypeError, a traceback.
    (f"host = \"{'ä' * 70}\"\n", "host"),
])
def test_bad_value_is_named(tmp_path, text, key):
    assert error_for(tmp_path, text).startswith(f"bad value for {key!r}")


def test_a_value_that_must_be_a_table_is_refused_even_beside_a_flag(tmp_path):
    # The flag's table replaced the file's "pop3 = 5", which then went unseen.
    config = tmp_path / "pymailsrv.toml"
    config.write_text("pop3 = 5\n")
    with pytest.raises(ConfigError, match="^bad value for 'pop3': expected a table"):
        load_settings(config=config, overrides={"pop3": {"port": 0}})


def test_invalid_toml_is_one_line(tmp_path):
    assert error_for(tmp_path, "[pop3\nport = 1\n").startswith("config file ")


def test_an_integer_int_refuses_is_one_line(tmp_path):
    # tomllib's int() refuses over 4300 digits with a plain ValueError.
    error = error_for(tmp_path, "[smtp]\nport = " + "9" * 5000 + "\n")
    assert error.startswith("config file ") and " is not valid TOML: " in error and "\n" not in error


def test_a_config_file_that_never_ends_is_one_line(tmp_path):
    # /dev/zero given by mistake: read to its end, it would take all memory.
    with pytest.raises(ConfigError) as refused:
        load_settings("/dev/zero")
    assert str(refused.value) == "config file '/dev/zero' is over 1,000,000 octets: is it the right file?"


def test_a_config_file_nested_too_deep_is_one_line(tmp_path):
    assert error_for(tmp_path, "a = " + "[" * 100_000 + "]" * 100_000 + "\n").endswith(" is nested too deep")


def test_config_file_not_in_utf8_is_one_line(tmp_path):
    (tmp_path / "c.toml").write_bytes(b"x = \xff\n")
    with pytest.raises(ConfigError, match="^config file '.*c.toml' is not valid TOML: 'utf-8' codec"):
        load_settings(tmp_path / "c.toml")


def test_missing_config_file_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="^cannot read config file '.*nothere.toml': No such file"):
        load_settings(tmp_path / "nothere.toml")


def test_settings_are_frozen():
    with pytest.raises(AttributeError):
        Settings().root = Path("x")  # type: ignore[misc]


def test_a_wait_for_the_client_shorter_than_its_rfc_asks_is_warned_of(start_server, caplog):
    # RFC 1939 §3: an autologout timer "MUST be of at least 10 minutes";
    # RFC 5321 §4.5.3.2.7: 5 minutes for the next SMTP command. Allowed (a
    # test wants answers now), but said.
    start_server(pop3={"autologout": 5.0}, smtp={"command_timeout": 10.0})
    assert ("pop3.autologout is 5 seconds: RFC 1939 §3 asks for at least 600, and a client idle longer "
            "is cut off") in caplog.text
    assert ("smtp.command_timeout is 10 seconds: RFC 5321 §4.5.3.2.7 asks for at least 300, and a client "
            "idle longer is cut off") in caplog.text


def test_the_default_waits_are_not_warned_of(caplog, start_server):
    start_server()
    assert "running as root" in caplog.text or "there are no users yet" in caplog.text  # the log was caught
    assert "asks for at least" not in caplog.text
