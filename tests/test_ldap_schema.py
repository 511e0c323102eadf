# -*- test-case-name: tests.test_ldap_schema -*-
"""Tests for etc/ldap (the schema in both forms, the example directory) against a real slapd.

Each test that needs a server starts its own tests.peers.slapd.Slapd (about 0.2 s) in
setUp and stops it by PID in a cleanup; clients are ldap3, as in milter-manager, and
ldap-utils where an admin would use them.
"""

import hashlib
import os
import re
import shutil
import ssl
import subprocess

import ldap3
from ldap3.core.exceptions import (
    LDAPException, LDAPInsufficientAccessRightsResult, LDAPSocketOpenError, LDAPStartTLSError,
)
from twisted.trial.unittest import SynchronousTestCase

from tests.peers.fixtures import _listening
from tests.peers.slapd import (
    AMAVIS_SCHEMA, CLIENT_ENV, EXAMPLE_LDIF, FIXTURES, IREDMAIL_LDIF, IREDMAIL_SCHEMA,
    MILTER_MANAGER_LDIF, MILTER_MANAGER_SCHEMA, SLAPADD, Slapd, ldif_records, parse_definition,
    parse_schema_conf, parse_schema_ldif, read_schema,
)

ARC = "2.25.14945764758834634205105498096645786094"
AMAVIS_ARC = "1.3.6.1.4.1.15312.2.2"
DIRECTORY_STRING = "1.3.6.1.4.1.1466.115.121.1.15"
POLICY_BASE = "ou=milter-policy,dc=example,dc=com"
ATTRIBUTES = ["mail", "milterManagerApply", "milterManagerBypass", "milterManagerEvaluate"]


def read(path):
    with open(path, encoding="utf-8") as file:
        return file.read()


def lookup_keys(address):
    """amavisd-new's lookup keys for address, most specific first (as etc/ldap/example.ldif lists)."""
    local, _, domain = address.lower().rpartition("@")
    keys = [f"{local}@{domain}"]
    if "+" in local:
        keys.append(f"{local.split('+', 1)[0]}@{domain}")
    keys.append(f"@{domain}")
    labels = domain.split(".")
    keys += [f"@.{'.'.join(labels[index:])}" for index in range(len(labels))]
    keys.append("@.")
    return keys


def fill(template, address):
    """A filter template with %m (the keys, OR-ed) and %d (the domain) filled in for address."""
    keys = lookup_keys(address)
    text = re.sub(r"\((\w+)=%m\)",
                  lambda match: "(|" + "".join(f"({match.group(1)}={key})" for key in keys) + ")",
                  template)
    return text.replace("%d", address.rpartition("@")[2])


def example_filters():
    """The ldap.filter values the comments of etc/ldap/example.ldif give."""
    return re.findall(r'(?m)^#\s+ldap\.filter\s*=\s*"([^"]+)"', read(EXAMPLE_LDIF))


class SlapdTestCase(SynchronousTestCase):
    """Starts one Slapd per test (see slapd_options) and connects ldap3 to it."""

    slapd_options = {}

    def setUp(self):
        self.slapd = self.make_slapd(**self.slapd_options)

    def make_slapd(self, **options):
        slapd = Slapd(self.mktemp(), **options)
        self.addCleanup(slapd.stop)
        slapd.start()
        return slapd

    def connect(self, user=None, password=None, uri=None, tls=None, get_info=ldap3.NONE):
        server = ldap3.Server(uri or self.slapd.uri, tls=tls, get_info=get_info, connect_timeout=5)
        connection = ldap3.Connection(server, user, password, raise_exceptions=True,
                                      receive_timeout=10)

        def close():
            try:
                connection.unbind()
            except LDAPException:
                pass  # a connection a test saw fail

        self.addCleanup(close)
        return connection

    def search(self, search_filter, base=POLICY_BASE, attributes=ATTRIBUTES, connection=None):
        """{DN: {attribute: sorted values}} of the entries the filter finds (anonymously)."""
        if connection is None:
            connection = self.connect()
            connection.bind()
        connection.search(base, search_filter, attributes=attributes)
        return {entry["dn"]: {name: sorted(values) for name, values in entry["attributes"].items()
                              if values}
                for entry in connection.response if entry["type"] == "searchResEntry"}


class SchemaFileTests(SynchronousTestCase):
    """The two forms of the schema define the same things (no server needed)."""

    def test_same_definitions(self):
        """milter-manager.schema and milter-manager.ldif define the same types and class."""
        conf = read_schema(MILTER_MANAGER_SCHEMA)
        ldif = read_schema(MILTER_MANAGER_LDIF)
        self.assertEqual(conf.definitions(), ldif.definitions())
        self.assertEqual(conf.object_identifiers, ldif.object_identifiers)
        names = {definition["NAME"]: oid for oid, definition in conf.definitions().items()}
        self.assertEqual(names, {
            ("milterManagerApply",): f"{ARC}.1.1",
            ("milterManagerBypass",): f"{ARC}.1.2",
            ("milterManagerEvaluate",): f"{ARC}.1.3",
            ("milterManagerPolicy",): f"{ARC}.2.1"})

    def test_definitions(self):
        """Multi-valued, case-exact directory strings; an auxiliary class that may hold mail."""
        definitions = read_schema(MILTER_MANAGER_SCHEMA).definitions()
        for number in (1, 2, 3):
            attribute = definitions[f"{ARC}.1.{number}"]
            self.assertEqual((attribute["EQUALITY"], attribute["SYNTAX"]),
                             ("caseExactMatch", DIRECTORY_STRING))
            self.assertNotIn("SINGLE-VALUE", attribute)
            self.assertIn("case-sensitive", attribute["DESC"])
        policy = definitions[f"{ARC}.2.1"]
        self.assertTrue(policy["AUXILIARY"])
        self.assertNotIn("MUST", policy)
        self.assertEqual(policy["MAY"], ("mail", "milterManagerApply", "milterManagerBypass",
                                         "milterManagerEvaluate", "description"))

    def test_comparison_sees_a_difference(self):
        """The comparison is not vacuous: a changed matching rule or MAY list differs."""
        text = read(MILTER_MANAGER_LDIF)
        conf = read_schema(MILTER_MANAGER_SCHEMA).definitions()
        for changed in (text.replace("EQUALITY caseExactMatch", "EQUALITY caseIgnoreMatch", 1),
                        text.replace("$ description", "")):
            self.assertNotEqual(changed, text)
            self.assertNotEqual(parse_schema_ldif(changed).definitions(), conf)

    def test_ldif_is_one_schema_entry(self):
        """The .ldif is one add record, cn=milter-manager,cn=schema,cn=config (ldapadd and slapadd -n0)."""
        [record] = ldif_records(read(MILTER_MANAGER_LDIF))
        self.assertEqual(record[0], ("dn", "cn=milter-manager,cn=schema,cn=config"))
        self.assertIn(("objectClass", "olcSchemaConfig"), record)
        self.assertNotIn("changetype", [name.lower() for name, _ in record])

    def test_parse_definition(self):
        """Keyword order and spacing do not matter; lists, flags and quoted strings are read."""
        one = parse_definition("( 1.2.3 NAME 'a' DESC 'x y' SUP top AUXILIARY MAY ( b $ c ) )")
        other = parse_definition("(1.2.3  AUXILIARY NAME ( 'a' ) SUP ( top )\n"
                                 " MAY (b$c) DESC 'x y')")
        self.assertEqual(one, other)
        self.assertEqual(one, {"OID": "1.2.3", "NAME": ("a",), "DESC": "x y", "SUP": ("top",),
                               "AUXILIARY": True, "MAY": ("b", "c")})
        self.assertRaises(ValueError, parse_definition, "( 1.2.3 NAME 'a' NAME 'b' )")
        self.assertRaises(ValueError, parse_definition, "1.2.3 NAME 'a'")

    def test_conf_parser_refuses_other_statements(self):
        """A .schema file holds schema statements only."""
        self.assertRaises(ValueError, parse_schema_conf, "include /etc/passwd\n")

    def test_amavis_schema_is_debians(self):
        """The amavis fixture is the verbatim file its README names, with amavisd-new's OIDs."""
        with open(AMAVIS_SCHEMA, "rb") as file:
            digest = hashlib.sha256(file.read()).hexdigest()
        self.assertIn(f"sha256 {digest}", read(os.path.join(FIXTURES, "README")))
        names = {definition["NAME"][0]: oid
                 for oid, definition in read_schema(AMAVIS_SCHEMA).definitions().items()}
        self.assertEqual(names["amavisBypassVirusChecks"], f"{AMAVIS_ARC}.1.3")
        self.assertEqual(names["amavisBypassSpamChecks"], f"{AMAVIS_ARC}.1.4")
        self.assertEqual(names["amavisSpamLover"], f"{AMAVIS_ARC}.1.12")
        self.assertEqual(names["amavisAccount"], f"{AMAVIS_ARC}.2.1")

    def test_iredmail_subset_is_test_only(self):
        """The iRedMail subset's OIDs are all under the test branch .99."""
        oids = read_schema(IREDMAIL_SCHEMA).definitions()
        self.assertEqual(len(oids), 7)
        self.assertEqual([oid for oid in oids if not oid.startswith(f"{ARC}.99.")], [])


class ExampleDirectoryTests(SlapdTestCase):
    """The shipped cn=config schema and etc/ldap/example.ldif in a fresh slapd."""

    slapd_options = {"ldif": [read(EXAMPLE_LDIF)]}

    def test_domain_entry(self):
        """The default filter for @example.com finds the domain entry with its several values."""
        found = self.search("(&(objectClass=milterManagerPolicy)(mail=@example.com))")
        self.assertEqual(found, {f"cn=example.com,{POLICY_BASE}": {
            "mail": ["@example.com"], "milterManagerApply": ["opendmarc", "spamass-milter"],
            "milterManagerBypass": ["greylist"]}})

    def test_lookup_keys(self):
        """The default ldap.filter over each address's keys finds the entries its comments say."""
        [default_filter] = [text for text in example_filters() if "domainName" not in text]
        self.assertEqual(default_filter, "(&(objectClass=milterManagerPolicy)(mail=%m))")
        cases = {
            "alice+news@example.com": {"alice@example.com", "example.com", "default"},
            "bob@example.com": {"example.com", "default"},
            "bob@lists.example.org": {".example.org", "default"},
            "bob@example.org": {".example.org", "default"},
            "bob@sub.example.com": {"default"},
            "bob@example.net": {"default"},
        }
        for address, names in cases.items():
            found = self.search(fill(default_filter, address))
            self.assertEqual(set(found), {f"cn={name},{POLICY_BASE}" for name in names}, address)

    def test_server_schema(self):
        """The server's subschema has our OIDs, the class as auxiliary, and amavisd-new's."""
        connection = self.connect(get_info=ldap3.SCHEMA)
        connection.bind()
        schema = connection.server.schema
        self.assertEqual(schema.attribute_types["milterManagerApply"].oid, f"{ARC}.1.1")
        self.assertEqual(schema.attribute_types["milterManagerEvaluate"].oid, f"{ARC}.1.3")
        policy = schema.object_classes["milterManagerPolicy"]
        self.assertEqual((policy.oid, policy.kind), (f"{ARC}.2.1", "AUXILIARY"))
        self.assertEqual(schema.attribute_types["amavisBypassSpamChecks"].oid, f"{AMAVIS_ARC}.1.4")
        self.assertEqual(schema.object_classes["amavisAccount"].kind, "AUXILIARY")

    def test_child_names_are_case_sensitive(self):
        """milterManager* values match exactly; mail keys match in any case."""
        self.assertEqual(self.search("(milterManagerBypass=Greylist)"), {})
        self.assertEqual(list(self.search("(milterManagerBypass=greylist)")),
                         [f"cn=example.com,{POLICY_BASE}"])
        self.assertEqual(list(self.search("(mail=@EXAMPLE.com)")), [f"cn=example.com,{POLICY_BASE}"])

    def test_auxiliary_needs_a_structural_class(self):
        """An entry with milterManagerPolicy alone is refused: it is auxiliary."""
        error = self.assertRaises(RuntimeError, self.slapd.add,
                                  f"dn: cn=lonely,{POLICY_BASE}\nobjectClass: milterManagerPolicy\n"
                                  "mail: @lonely.example\n")
        self.assertIn("no structural object class", str(error))

    def test_amavis_attributes(self):
        """amavisAccount's attributes can be set beside ours; a non-Boolean value is refused."""
        self.slapd.add(f"""\
dn: cn=example.net,{POLICY_BASE}
objectClass: organizationalRole
objectClass: milterManagerPolicy
objectClass: amavisAccount
cn: example.net
mail: @example.net
milterManagerBypass: greylist
amavisBypassSpamChecks: TRUE
amavisBypassVirusChecks: FALSE
amavisSpamLover: TRUE
""")
        attributes = ATTRIBUTES + ["amavisBypassSpamChecks", "amavisBypassVirusChecks",
                                   "amavisSpamLover"]
        found = self.search("(&(objectClass=milterManagerPolicy)(amavisBypassSpamChecks=TRUE))",
                            attributes=attributes)
        self.assertEqual(found, {f"cn=example.net,{POLICY_BASE}": {
            "mail": ["@example.net"], "milterManagerBypass": ["greylist"],
            "amavisBypassSpamChecks": ["TRUE"], "amavisBypassVirusChecks": ["FALSE"],
            "amavisSpamLover": ["TRUE"]}})
        error = self.assertRaises(RuntimeError, self.slapd.modify, f"""\
dn: cn=example.net,{POLICY_BASE}
changetype: modify
replace: amavisSpamLover
amavisSpamLover: yes
""")
        self.assertIn("Invalid syntax", str(error))

    def test_reader_reads_but_cannot_write(self):
        """The reader binds and reads; writes are refused; nobody but the admin reads passwords."""
        connection = self.connect(self.slapd.reader_dn, self.slapd.reader_password)
        connection.bind()
        self.assertEqual(connection.extend.standard.who_am_i(), f"dn:{self.slapd.reader_dn}")
        self.assertEqual(len(self.search("(objectClass=milterManagerPolicy)",
                                         connection=connection)), 4)
        self.assertRaises(LDAPInsufficientAccessRightsResult, connection.modify,
                          f"cn=default,{POLICY_BASE}",
                          {"milterManagerBypass": [(ldap3.MODIFY_ADD, ["greylist"])]})
        anonymous = self.search("(cn=reader)", base=self.slapd.base, attributes=["*"])
        self.assertEqual(list(anonymous), [self.slapd.reader_dn])
        self.assertNotIn("userPassword", anonymous[self.slapd.reader_dn])

    def test_restart_keeps_data_and_port(self):
        """restart() comes back on the same port with what was added, adding nothing again."""
        uri = self.slapd.uri
        self.slapd.modify(f"""\
dn: cn=default,{POLICY_BASE}
changetype: modify
add: milterManagerBypass
milterManagerBypass: clamav-milter
""")
        first = self.slapd.process.pid
        self.slapd.restart()
        self.assertNotEqual(self.slapd.process.pid, first)
        self.assertEqual(self.slapd.uri, uri)
        found = self.search("(mail=@.)")
        self.assertEqual(found[f"cn=default,{POLICY_BASE}"]["milterManagerBypass"],
                         ["clamav-milter"])
        log = self.slapd.log()
        self.assertEqual(log.count("slapd starting"), 2)
        self.assertEqual(log.count(f'ADD dn="{self.slapd.base}"'), 1)


class LoadIntoRunningServerTests(SlapdTestCase):
    """README's ways to add the schema to a slapd that does not have it yet."""

    slapd_options = {"milter_schema": False}
    ENTRY = (f"dn: {POLICY_BASE}\nobjectClass: organizationalUnit\nobjectClass: milterManagerPolicy\n"
             "ou: milter-policy\nmail: @.\n")

    def assertLoadsExample(self):
        self.slapd.add(read(EXAMPLE_LDIF))
        self.assertEqual(len(self.search("(objectClass=milterManagerPolicy)")), 4)

    def test_ldapadd_external(self):
        """`ldapadd -Y EXTERNAL -H ldapi:/// -f milter-manager.ldif` as root, on the running server."""
        error = self.assertRaises(RuntimeError, self.slapd.add, self.ENTRY)
        # value #1: the second objectClass, milterManagerPolicy, is unknown.
        self.assertIn("objectClass: value #1 invalid per syntax", str(error))
        result = subprocess.run(["ldapadd", "-Q", "-Y", "EXTERNAL", "-H", self.slapd.ldapi_uri,
                                 "-f", MILTER_MANAGER_LDIF],
                                capture_output=True, text=True, env=CLIENT_ENV, timeout=60,
                                check=False)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(result.stdout, r'adding new entry "cn=milter-manager,cn=schema,cn=config"')
        self.assertLoadsExample()

    def test_slapadd_offline(self):
        """`slapadd -n0 -F slapd.d -l milter-manager.ldif` with slapd stopped, then a start."""
        self.slapd.stop()
        result = subprocess.run([SLAPADD, "-n0", "-F", self.slapd.config_dir, "-l",
                                 MILTER_MANAGER_LDIF], capture_output=True, text=True, timeout=60,
                                check=False)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        shutil.chown(self.slapd.config_dir, "openldap", "openldap")
        for directory, names, files in os.walk(self.slapd.config_dir):
            for name in names + files:
                shutil.chown(os.path.join(directory, name), "openldap", "openldap")
        self.slapd.start()
        self.assertLoadsExample()


class ConfStyleTests(SlapdTestCase):
    """slapd.conf with `include .../milter-manager.schema` (the file itself), TLS on too."""

    slapd_options = {"conf_style": True, "tls": True, "ldif": [read(EXAMPLE_LDIF)]}

    def test_schema_file_loads(self):
        """slapd reads the shipped .schema and amavisd-new's file as they are; the example loads."""
        with open(os.path.join(self.slapd.tmpdir, "slapd.conf"), encoding="utf-8") as file:
            includes = re.findall(r'(?m)^include "([^"]+)"$', file.read())
        self.assertIn(MILTER_MANAGER_SCHEMA, includes)
        self.assertIn(AMAVIS_SCHEMA, includes)
        self.assertFalse(os.path.exists(self.slapd.config_dir + "/cn=config.ldif"))
        tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=self.slapd.ca_file)
        connection = self.connect(uri=self.slapd.ldaps_uri, tls=tls, get_info=ldap3.SCHEMA)
        connection.bind()
        self.assertEqual(connection.server.schema.object_classes["milterManagerPolicy"].oid,
                         f"{ARC}.2.1")
        found = self.search("(&(objectClass=milterManagerPolicy)(mail=@example.com))",
                            connection=connection)
        self.assertEqual(list(found), [f"cn=example.com,{POLICY_BASE}"])


class IRedMailTests(SlapdTestCase):
    """example.ldif's iRedMail filter on a directory laid out as iRedMail's."""

    slapd_options = {"schemas": [IREDMAIL_SCHEMA], "ldif": [read(IREDMAIL_LDIF)]}
    BASE = "o=domains,dc=example,dc=com"
    DOMAIN = f"domainName=example.net,{BASE}"
    BOB = f"mail=bob@example.net,ou=Users,{DOMAIN}"
    DEFAULT = f"cn=default,{BASE}"

    def test_filter(self):
        """Users by mail or shadowAddress, domains by name or alias, disabled ones skipped."""
        [template] = [text for text in example_filters() if "domainName" in text]
        cases = {
            "bob@example.net": {self.BOB, self.DOMAIN, self.DEFAULT},
            "robert@example.net": {self.BOB, self.DOMAIN, self.DEFAULT},
            "carol@example.net": {self.DOMAIN, self.DEFAULT},  # carol is disabled
            "anyone@example.info": {self.DOMAIN, self.DEFAULT},  # the domain's alias
            "anyone@example.org": {self.DEFAULT},  # a disabled domain
        }
        for address, wanted in cases.items():
            self.assertEqual(set(self.search(fill(template, address), base=self.BASE)), wanted,
                             address)

    def test_entries_carry_both_schemas(self):
        """A user entry holds iRedMail's, amavisd-new's and milter-manager's attributes together."""
        found = self.search("(mail=bob@example.net)", base=self.BASE,
                            attributes=["milterManagerApply", "amavisSpamLover", "accountStatus"])
        self.assertEqual(found, {self.BOB: {"milterManagerApply": ["greylist"],
                                            "amavisSpamLover": ["TRUE"],
                                            "accountStatus": ["active"]}})


class TLSTests(SlapdTestCase):
    """tls=True: ldaps:// and StartTLS with the fixture's CA, refused without it."""

    slapd_options = {"tls": True}

    def trusting(self):
        return ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=self.slapd.ca_file)

    def test_ldaps(self):
        """ldaps:// verifies against ca_file; the reader binds over it."""
        connection = self.connect(self.slapd.reader_dn, self.slapd.reader_password,
                                  uri=self.slapd.ldaps_uri, tls=self.trusting())
        connection.bind()
        self.assertIsInstance(connection.socket, ssl.SSLSocket)
        self.assertEqual(connection.extend.standard.who_am_i(), f"dn:{self.slapd.reader_dn}")

    def test_start_tls(self):
        """StartTLS on ldap:// verifies against ca_file."""
        connection = self.connect(self.slapd.reader_dn, self.slapd.reader_password,
                                  tls=self.trusting())
        connection.open()
        self.assertNotIsInstance(connection.socket, ssl.SSLSocket)
        self.assertTrue(connection.start_tls())
        self.assertIsInstance(connection.socket, ssl.SSLSocket)
        connection.bind()
        self.assertEqual(connection.extend.standard.who_am_i(), f"dn:{self.slapd.reader_dn}")

    def test_untrusted_certificate(self):
        """Without the fixture's CA (the system's CAs only), both ways fail verification."""
        untrusting = ldap3.Tls(validate=ssl.CERT_REQUIRED)
        connection = self.connect(uri=self.slapd.ldaps_uri, tls=untrusting)
        error = self.assertRaises(LDAPSocketOpenError, connection.open)
        self.assertIn("CERTIFICATE_VERIFY_FAILED", str(error))
        connection = self.connect(tls=untrusting)
        connection.open()
        error = self.assertRaises((LDAPStartTLSError, LDAPSocketOpenError), connection.start_tls)
        self.assertIn("CERTIFICATE_VERIFY_FAILED", str(error))


class StartFailureTests(SynchronousTestCase):
    """A start that fails half-way leaves nothing running."""

    def test_bad_ldif(self):
        """slapd ran, the LDIF was refused: start() raises, slapd is stopped, the port is free."""
        entry = "dn: cn=x,dc=example,dc=com\nobjectClass: nosuchclass\ncn: x\n"
        slapd = Slapd(self.mktemp(), ldif=[entry])
        self.addCleanup(slapd.stop)
        error = self.assertRaises(RuntimeError, slapd.start)
        self.assertIn("ldapadd failed", str(error))
        self.assertIsNotNone(slapd.process)
        self.assertIsNotNone(slapd.process.poll())
        self.assertFalse(_listening(slapd.port))
        self.assertIn("slapd stopped", slapd.log())
        self.assertEqual([name for name in os.listdir("/tmp")
                          if os.path.islink(f"/tmp/{name}")
                          and os.readlink(f"/tmp/{name}") == slapd.run_dir], [])

    def test_bad_schema(self):
        """A schema slapadd refuses: start() raises before any slapd runs."""
        path = os.path.abspath(self.mktemp() + ".schema")
        with open(path, "w", encoding="utf-8") as file:
            file.write(f"attributetype ( {ARC}.99.1.100 NAME 'broken' SYNTAX 9.9.9 )\n")
        slapd = Slapd(self.mktemp(), schemas=[path])
        self.addCleanup(slapd.stop)
        error = self.assertRaises(RuntimeError, slapd.start)
        self.assertIn("slapadd -n0 failed", str(error))
        self.assertIsNone(slapd.process)
