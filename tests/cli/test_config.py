"""Configuration: TOML in, validated frozen settings out, errors naming the key."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from pobox.config import (
    KEYS,
    SECTIONS,
    Config,
    Listen,
    build_config,
    dump_config,
    keys_help,
    load_config,
    markdown_table,
    parse_listen,
    readme_with_table,
)
from pobox.errors import ConfigError


class TestParseListen:
    """Listen addresses."""

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("127.0.0.1:110", Listen("127.0.0.1", 110)),
            ("[::1]:995", Listen("::1", 995)),
            ("1110", Listen("127.0.0.1", 1110)),
            (":110", Listen("0.0.0.0", 110)),
        ],
    )
    def test_forms(self, text: str, expected: Listen) -> None:
        """HOST:PORT, [V6]:PORT, a bare port and :PORT are understood."""
        assert expected == parse_listen(text)

    @pytest.mark.parametrize("text", ["host", "1.2.3.4:x", "1.2.3.4:70000", "[::1]995"])
    def test_bad(self, text: str) -> None:
        """Anything else is a ConfigError naming the key."""
        with pytest.raises(ConfigError, match=r"^listen: "):
            parse_listen(text)


class TestBuildConfig:
    """Validation of TOML-shaped values."""

    def test_defaults(self) -> None:
        """With nothing set, the defaults are the documented ones."""
        config = build_config({})
        assert (Listen("127.0.0.1", 1110),) == config.listen
        assert 600.0 == config.idle_timeout
        assert config.pop3_lock_session is True

    def test_unknown_key_named(self) -> None:
        """An unknown key is an error that names it and the key it is a typo of."""
        with pytest.raises(ConfigError) as raised:
            build_config({"idel_timeout": 5})
        assert "unknown key 'idel_timeout' (did you mean 'idle_timeout'?)" == str(raised.value)

    def test_unknown_key_without_a_near_one(self) -> None:
        """A name like no key gets a pointer to the key list, not a dump of every key."""
        with pytest.raises(ConfigError) as raised:
            build_config({"frobnicate": 5})
        assert "unknown key 'frobnicate' (see the keys in README.md or pobox serve --help)" == str(
            raised.value
        )

    def test_wrong_type_named(self) -> None:
        """A value of the wrong type is an error naming the key and the value."""
        with pytest.raises(ConfigError, match=r"^pop3_lock_session: expected bool, got str"):
            build_config({"pop3_lock_session": "yes"})

    def test_int_accepted_for_float(self) -> None:
        """Whole numbers are fine where seconds are expected."""
        assert 30.0 == build_config({"login_timeout": 30}).login_timeout

    def test_bad_listen_entry_named_with_index(self) -> None:
        """A bad listen entry names its index."""
        with pytest.raises(ConfigError, match=r"^listen\[1\]: "):
            build_config({"listen": ["127.0.0.1:110", "nope"]})

    @pytest.mark.parametrize("location", ["sdbox:~/mail", "mbox:", "mbox:~/mail:INBOX="])
    def test_mail_location_must_be_maildir_or_mbox(self, location: str) -> None:
        """Only maildir:, mbox: (with a path) and postgresql locations exist."""
        with pytest.raises(ConfigError, match=r"^mail_location: "):
            build_config({"mail_location": location})

    @pytest.mark.parametrize("location", ["mbox:/var/mail/%u", "mbox:~/mail:INBOX=/var/mail/%u"])
    def test_mbox_locations_accepted(self, location: str) -> None:
        """Dovecot's two mbox forms are taken as written."""
        assert location == build_config({"mail_location": location}).mail_location

    def test_mbox_refuses_retention(self) -> None:
        """Deleted-mail retention is Maildir's: with mbox it is refused, naming the key."""
        with pytest.raises(ConfigError, match=r"^pop3_delete_retention: "):
            build_config({"mail_location": "mbox:/var/mail/%u", "pop3_delete_retention": "7d"})

    def test_mbox_refuses_expire_days(self) -> None:
        """EXPIRE needs first-RETR times, which mbox does not keep: refused, NEVER allowed."""
        mbox = {"mail_location": "mbox:/var/mail/%u"}
        for days in ("0", "30"):
            with pytest.raises(ConfigError, match=r"^pop3_expire_days: "):
                build_config({**mbox, "pop3_expire_days": days})
        assert "NEVER" == build_config({**mbox, "pop3_expire_days": "never"}).pop3_expire_days

    def test_greeting_limits(self) -> None:
        """The greeting must be one line within RFC 2449's 512-octet status line."""
        with pytest.raises(ConfigError, match=r"^login_greeting: "):
            build_config({"login_greeting": "a\r\nb"})
        with pytest.raises(ConfigError, match=r"^login_greeting: "):
            build_config({"login_greeting": "x" * 507})

    def test_short_autologout_warns(self) -> None:
        """An idle_timeout below RFC 1939's 10 minutes is allowed with a warning."""
        config = build_config({"idle_timeout": 5})
        assert ("idle_timeout: 5 s is below the 600 s RFC 1939 requires",) == config.warnings

    def test_event_loop_choice(self) -> None:
        """event_loop takes auto, uvloop or asyncio, nothing else."""
        assert "asyncio" == build_config({"event_loop": "asyncio"}).event_loop
        with pytest.raises(ConfigError, match=r"^event_loop: "):
            build_config({"event_loop": "trio"})

    def test_zero_timeout_refused(self) -> None:
        """A zero timeout would close every session at once: refused."""
        with pytest.raises(ConfigError, match=r"^login_timeout: "):
            build_config({"login_timeout": 0})

    def test_login_deadline(self) -> None:
        """login_deadline defaults to Dovecot's 180 s and must be positive."""
        assert 180.0 == build_config({}).login_deadline
        assert 30.0 == build_config({"login_deadline": 30}).login_deadline
        with pytest.raises(ConfigError, match=r"^login_deadline: "):
            build_config({"login_deadline": 0})

    def test_override_base(self) -> None:
        """Values replace those of the base config only where given."""
        base = Config(passwd_file="/x/passwd")
        config = build_config({"trace": True}, base=base)
        assert ("/x/passwd", True) == (config.passwd_file, config.trace)


class TestDeliveryKeys:
    """The delivery listeners' caps, deadlines and spool directory."""

    def test_defaults(self) -> None:
        """Caps per protocol, RFC 5321's five minutes, and the system's temporary directory."""
        config = build_config({})
        assert (100, 50, 100, 20, 300.0, 2048, "") == (
            config.lmtp_max_connections,
            config.lmtp_max_connections_per_ip,
            config.smtp_max_connections,
            config.smtp_max_connections_per_ip,
            config.delivery_timeout,
            config.delivery_min_data_rate,
            config.mail_temp_dir,
        )

    @pytest.mark.parametrize(
        "key",
        [
            "lmtp_max_connections",
            "lmtp_max_connections_per_ip",
            "smtp_max_connections",
            "smtp_max_connections_per_ip",
            "delivery_min_data_rate",
        ],
    )
    def test_zero_refused(self, key: str) -> None:
        """A cap or a rate of zero is an error naming the key."""
        with pytest.raises(ConfigError, match=f"^{key}: must be at least 1"):
            build_config({key: 0})

    def test_zero_delivery_timeout_refused(self) -> None:
        """A zero delivery_timeout would close every delivery connection at once."""
        with pytest.raises(ConfigError, match=r"^delivery_timeout: "):
            build_config({"delivery_timeout": 0})

    @pytest.mark.parametrize("value", ["spool", "/nonexistent/pobox-spool"])
    def test_mail_temp_dir_must_be_an_absolute_directory(self, value: str) -> None:
        """A relative path or a missing directory is found at start-up, not at a delivery."""
        with pytest.raises(ConfigError, match=r"^mail_temp_dir: .* is not an absolute directory"):
            build_config({"mail_temp_dir": value})

    def test_mail_temp_dir_accepted(self, tmp_path: Path) -> None:
        """An existing absolute directory is taken as it is."""
        assert str(tmp_path) == build_config({"mail_temp_dir": str(tmp_path)}).mail_temp_dir


class TestLoadConfig:
    """Reading TOML files."""

    def test_file_and_overrides(self, tmp_path: Path) -> None:
        """Command-line overrides beat the file."""
        path = tmp_path / "pobox.toml"
        path.write_text('listen = ["127.0.0.1:2110"]\nlog_level = "debug"\n')
        config = load_config(path, {"log_level": "warning"})
        assert (Listen("127.0.0.1", 2110),) == config.listen
        assert "warning" == config.log_level

    def test_bad_toml(self, tmp_path: Path) -> None:
        """A syntax error names the file and the line."""
        path = tmp_path / "pobox.toml"
        path.write_text("listen = [\n")
        with pytest.raises(ConfigError, match=r"pobox.toml:1: not valid TOML"):
            load_config(path)

    def test_bad_toml_line_and_column(self, tmp_path: Path) -> None:
        """A syntax error says the file, the line and the column, as editors read them."""
        path = tmp_path / "pobox.toml"
        path.write_text('listen = ["127.0.0.1:110"]\nlog_level = debug\n')
        with pytest.raises(ConfigError) as raised:
            load_config(path)
        assert f"{path}:2:13: not valid TOML: Invalid value" == str(raised.value)

    def test_bad_toml_at_the_end(self, tmp_path: Path) -> None:
        """An array left open is reported on the last line of the file."""
        path = tmp_path / "pobox.toml"
        path.write_text('log_level = "debug"\nlisten = [\n  "127.0.0.1:110",\n')
        with pytest.raises(ConfigError) as raised:
            load_config(path)
        assert f"{path}:3: not valid TOML: Invalid value at the end" == str(raised.value)

    def test_not_utf8(self, tmp_path: Path) -> None:
        """A file in another encoding is refused with the line of the first bad octet."""
        path = tmp_path / "pobox.toml"
        path.write_bytes(b'log_level = "debug"\nlogin_greeting = "caf\xe9"\n')
        with pytest.raises(ConfigError) as raised:
            load_config(path)
        assert f"{path}:2: not valid TOML: not UTF-8" == str(raised.value)

    def test_error_names_the_line_of_the_key(self, tmp_path: Path) -> None:
        """A bad value in a file is reported with the file and the line of its key."""
        path = tmp_path / "pobox.toml"
        path.write_text('# pobox\nlisten = ["127.0.0.1:110"]\n\nlistne = ["127.0.0.1:111"]\n')
        with pytest.raises(ConfigError) as raised:
            load_config(path)
        assert f"{path}:4: unknown key 'listne' (did you mean 'listen'?)" == str(raised.value)

    def test_missing_file(self, tmp_path: Path) -> None:
        """A missing file names the file."""
        with pytest.raises(ConfigError, match=r"cannot read the config file"):
            load_config(tmp_path / "nope.toml")


class TestUserdbKeys:
    """userdb and the PostgreSQL user keys are checked at start-up, naming the key."""

    def test_default_is_passwd_file(self) -> None:
        """Without userdb the passwd-file is the user database."""
        assert "passwd-file" == build_config({}).userdb

    @pytest.mark.parametrize(
        ("values", "key"),
        [
            ({"userdb": "ldap"}, "userdb"),
            ({"postgresql_user_cache_ttl": -1}, "postgresql_user_cache_ttl"),
            (
                {"postgresql_password_query": "SELECT pw FROM u WHERE name = '%u'"},
                "postgresql_password_query",
            ),
            (
                {"postgresql_password_query": "SELECT pw FROM u WHERE n = %(login)s"},
                "postgresql_password_query",
            ),
            ({"postgresql_user_query": "SELECT 1"}, "postgresql_password_query"),
            (
                {
                    "postgresql_password_query": "SELECT 1",
                    "postgresql_iterate_query": "SELECT name FROM u WHERE d = %s",
                },
                "postgresql_iterate_query",
            ),
        ],
    )
    def test_refused(self, values: dict[str, object], key: str) -> None:
        """Bad values, Dovecot's pasted-in '%u' and stray % are refused, naming the key."""
        with pytest.raises(ConfigError, match=key):
            build_config(values)

    def test_bound_parameters_and_percent_accepted(self) -> None:
        """%(user)s, %(username)s, %(domain)s and %% are accepted."""
        query = (
            "SELECT pw AS password FROM u WHERE l = %(username)s AND d = %(domain)s"
            " AND f = %(user)s AND n LIKE 'x%%'"
        )
        assert query == build_config({"postgresql_password_query": query}).postgresql_password_query


class TestHealthKeys:
    """health_listen and drain_timeout: off and 30 s by default, checked at start-up."""

    def test_defaults(self) -> None:
        """No health endpoint, a 30 s drain."""
        config = build_config({})
        assert ("", 30.0) == (config.health_listen, config.drain_timeout)

    def test_accepted(self) -> None:
        """An address and a drain of 0 (close at once) are accepted."""
        config = build_config({"health_listen": "127.0.0.1:8080", "drain_timeout": 0})
        assert ("127.0.0.1:8080", 0.0) == (config.health_listen, config.drain_timeout)

    @pytest.mark.parametrize(
        ("values", "key"),
        [
            ({"health_listen": "127.0.0.1"}, "health_listen"),
            ({"health_listen": "[::1]8080"}, "health_listen"),
            ({"health_listen": 8080}, "health_listen"),
            ({"drain_timeout": -1}, "drain_timeout"),
            ({"drain_timeout": "30"}, "drain_timeout"),
        ],
    )
    def test_refused(self, values: dict[str, object], key: str) -> None:
        """A malformed address or a negative drain is refused, naming the key."""
        with pytest.raises(ConfigError, match=rf"^{key}: "):
            build_config(values)


class TestDocumented:
    """Every configuration key is in README.md, where admins look for it."""

    def test_every_key_is_in_the_readme(self) -> None:
        """Each key of config.KEYS appears as `key` in README.md."""
        readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
        assert [] == [key for key in KEYS if f"`{key}`" not in readme]

    def test_readme_table_is_the_declaration(self) -> None:
        """README's key table is what the declaration makes (scripts/update-config-table)."""
        readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
        assert readme_with_table(readme) == readme

    def test_table_has_a_row_per_key(self) -> None:
        """The generated tables have one row per key, under its section, with its default."""
        rows = [row for row in markdown_table().splitlines() if row.startswith("| `")]
        assert sorted(KEYS) == sorted(row.split("`")[1] for row in rows)
        assert rows[0].startswith('| `listen` | `["127.0.0.1:1110"]` | ')
        assert "| `idle_timeout` | `600` | " in markdown_table()
        titles = [line[2:-2] for line in markdown_table().splitlines() if line.startswith("**")]
        assert list(SECTIONS) == titles
        tls = markdown_table().split("**TLS**")[1].split("**Mail and its owners**")[0]
        names = [row.split("`")[1] for row in tls.splitlines() if row.startswith("| `")]
        assert ["ssl_cert", "ssl_key", "ssl_listen", "ssl_min_protocol", "ssl_client_ca",
                "ssl_sni"] == names  # fmt: skip

    def test_every_section_has_keys(self) -> None:
        """No heading is left empty."""
        assert [] == [
            title for title in SECTIONS if not any(s.section == title for s in KEYS.values())
        ]

    def test_serve_help_lists_every_key(self) -> None:
        """pobox serve --help shows each key with its default and its help, no Markdown."""
        text = keys_help()
        assert [] == [key for key in KEYS if f"\n  {key} = " not in "\n" + text]
        assert "  login_greeting = pobox ready.\n      Text after +OK in the greeting." in text
        assert "`" not in text


class TestDeclaration:
    """One declaration per key: Config's defaults, types and limits all come from it."""

    def test_keys_are_the_config_fields(self) -> None:
        """Every Config attribute but warnings is a key, with the field's default."""
        fields = {f.name: f.default for f in dataclasses.fields(Config) if f.name != "warnings"}
        assert fields == {name: spec.default for name, spec in KEYS.items()}

    def test_every_key_documented(self) -> None:
        """Every key has a help text that ends a sentence."""
        assert [] == [name for name, spec in KEYS.items() if not spec.doc.endswith((".", ")"))]

    def test_defaults_are_valid(self) -> None:
        """The defaults pass their own declaration's checks."""
        for spec in KEYS.values():
            spec.validate(spec.default)

    @pytest.mark.parametrize(
        ("values", "message"),
        [
            (
                {"log_level": "loud"},
                "log_level: 'loud' is not one of debug, info, warning or error",
            ),
            ({"log_format": "xml"}, "log_format: 'xml' is not one of pobox, dovecot or json"),
            ({"max_connections": 0}, "max_connections: must be at least 1"),
            ({"quota_bytes": -1}, "quota_bytes: must not be negative"),
            ({"workers": -1}, "workers: must not be negative (0: one per CPU)"),
            ({"idle_timeout": 0}, "idle_timeout: must be a positive number of seconds"),
            ({"listen": "127.0.0.1:110"}, "listen: expected list, got str '127.0.0.1:110'"),
            ({"trace": 1}, "trace: expected bool, got int 1"),
            ({"max_connections": True}, "max_connections: expected int, got bool True"),
        ],
    )
    def test_limits_from_the_declaration(self, values: dict[str, object], message: str) -> None:
        """Choices, ranges and types are checked as declared, naming the key."""
        with pytest.raises(ConfigError) as raised:
            build_config(values)
        assert message == str(raised.value)

    def test_sni_subkey_typo(self) -> None:
        """A typo inside an [ssl_sni."name"] table is named with the key it is close to."""
        with pytest.raises(ConfigError) as raised:
            build_config({"ssl_sni": {"mail.test": {"certt": "/c", "key": "/k"}}})
        assert "ssl_sni.mail.test: unknown key 'certt' (did you mean 'cert'?)" == str(raised.value)

    def test_base_values_are_checked_too(self) -> None:
        """A value that came from the base config is checked like one from the file."""
        with pytest.raises(ConfigError, match=r"^max_bad_commands: must be at least 1$"):
            build_config({}, base=Config(max_bad_commands=0))


class TestDump:
    """config dump: TOML that reads back to the same configuration."""

    def test_defaults_dump_nothing(self) -> None:
        """The default configuration differs from the defaults in nothing."""
        assert "" == dump_config(build_config({}))

    def test_only_what_differs(self) -> None:
        """Only keys that differ from their defaults are written."""
        config = build_config({"idle_timeout": 900, "trace": True, "login_trusted_networks": []})
        assert "idle_timeout = 900\ntrace = true\n" == dump_config(config)

    def test_round_trip(self, tmp_path: Path) -> None:
        """Lists, tables, odd strings and converted values come back as they were."""
        cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
        cert.write_text("x")
        key.write_text("x")
        values = {
            "listen": ["127.0.0.1:2110", "[::1]:2110", ":2111"],
            "login_greeting": 'say "hi" \\ there\t\u00e9\u2603',
            "mail_uid": 1000,
            "login_trusted_networks": ["10.1.2.3/8"],
            "local_domains": ["Example.ORG."],
            "lmtp_listen": ["unix:/run/pobox/lmtp", "127.0.0.1:24"],
            "ssl_cert": str(cert),
            "ssl_key": str(key),
            "ssl_sni": {"Mail.Example.org": {"cert": str(cert), "key": str(key)}},
            "shared_state_timeout": 0.25,
            "postgresql_password_query": "SELECT pw FROM u WHERE n = %(user)s AND x LIKE 'a%%'",
        }
        config = build_config(values)
        for every in (False, True):
            text = dump_config(config, every=every)
            assert config == build_config(tomllib.loads(text))
        assert '[ssl_sni."mail.example.org"]' in dump_config(config)

    def test_every_key_with_all(self) -> None:
        """--all writes every key, and it reads back to the defaults."""
        text = dump_config(build_config({}), every=True)
        assert list(KEYS) == [line.split(" = ")[0] for line in text.splitlines()]
        assert Config() == build_config(tomllib.loads(text))

    @pytest.mark.parametrize(
        "dsn",
        [
            "host=db1 dbname=pobox user=pobox password=s3cret",
            "postgresql://pobox:s3cret@db1/pobox",
            "postgresql://pobox@db1/pobox?PASSWORD = s3cret",
        ],
    )
    def test_password_hidden(self, dsn: str) -> None:
        """A postgresql_dsn with a password is a comment unless secrets are asked for."""
        config = build_config({"postgresql_dsn": dsn})
        hidden = "# postgresql_dsn = (hidden: it holds a password; --secrets prints it)\n"
        assert hidden == dump_config(config)
        assert config == build_config(tomllib.loads(dump_config(config, secrets=True)))

    def test_dsn_without_password_shown(self) -> None:
        """A DSN without a password (~/.pgpass holds it) is printed as it is."""
        config = build_config({"postgresql_dsn": "postgresql://pobox@db1:5432/pobox"})
        assert 'postgresql_dsn = "postgresql://pobox@db1:5432/pobox"\n' == dump_config(config)

    def test_control_characters_escaped(self) -> None:
        """A string with control characters is written as a valid TOML string."""
        config = build_config({"node_name": "a"}, base=Config(passwd_file="/x\x7f\x01\ny"))
        text = dump_config(config)
        assert "/x\x7f\x01\ny" == tomllib.loads(text)["passwd_file"]
        assert "\x7f" not in text


class TestFolderKeys:
    """``pop3_folders`` and ``pop3_folder_mark``."""

    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            (["INBOX", "Junk"], ("INBOX", "Junk")),
            ("inbox, Junk ,Junk", ("INBOX", "Junk")),
            (["Junk E-mail"], ("Junk E-mail",)),
        ],
    )
    def test_read(self, value: object, expected: tuple[str, ...]) -> None:
        """A list or a comma-separated string; INBOX canonical; repeats dropped."""
        assert expected == build_config({"pop3_folders": value}).pop3_folders

    def test_default(self) -> None:
        """The INBOX alone, no mark."""
        config = build_config({})
        assert (("INBOX",), "none") == (config.pop3_folders, config.pop3_folder_mark)

    @pytest.mark.parametrize("value", [[], [".Junk"], ["../x"], ["a/b"], [3], ""])
    def test_refused(self, value: object) -> None:
        """No folder, or a name that is not a folder name, names the key."""
        with pytest.raises(ConfigError, match="pop3_folders"):
            build_config({"pop3_folders": value})

    def test_mark_choices(self) -> None:
        """An unknown mark names the key."""
        assert "subject" == build_config({"pop3_folder_mark": "subject"}).pop3_folder_mark
        with pytest.raises(ConfigError, match="pop3_folder_mark"):
            build_config({"pop3_folder_mark": "colour"})
