"""A throwaway OpenLDAP slapd on loopback, with milter-manager's and amavisd-new's schemas.

Everything lives under tmpdir; slapd runs in the foreground (`-d stats`, its
log in tmpdir/slapd.log) as the openldap user, listens on 127.0.0.1 only (and
on a UNIX socket, ldapi_uri, for SASL EXTERNAL as root), and is stopped by PID::

    slapd = Slapd(self.mktemp(), ldif=[text])
    self.addCleanup(slapd.stop)
    slapd.start()

By default (cn=config style) its configuration is built with `slapadd -n0`
from core, cosine, inetorgperson and nis, the shipped etc/ldap/milter-manager.ldif,
amavisd-new's schema (tests/fixtures/ldap/amavis.schema, converted here) and
any extra schemas; conf_style=True runs `slapd -f slapd.conf` with the .schema
files included as they are (etc/ldap/milter-manager.schema among them).
The suffix entry and a read-only bind user (reader_dn, reader_password) are
added over LDAP as the admin (admin_dn, admin_password), then the given LDIF
texts. Anonymous users and the reader may read everything but userPassword.
With tls=True a throwaway CA (ca_file) and a certificate for 127.0.0.1 and
localhost serve StartTLS on uri and TLS on ldaps_uri.

The schema helpers read slapd.conf-style (.schema) and cn=config (.ldif)
schema files into one form, parse definitions and convert between the two.
The fixture needs slapd, ldap-utils and openssl (scripts/install-test-deps).
"""

import base64
import grp
import hashlib
import os
import pwd
import re
import secrets
import subprocess
import urllib.parse
from dataclasses import dataclass, field

from .fixtures import HOST, _make_reachable, _short_link, free_port, stop_pid, wait_for_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHIPPED_LDAP = os.path.join(ROOT, "etc", "ldap")
MILTER_MANAGER_SCHEMA = os.path.join(SHIPPED_LDAP, "milter-manager.schema")
MILTER_MANAGER_LDIF = os.path.join(SHIPPED_LDAP, "milter-manager.ldif")
EXAMPLE_LDIF = os.path.join(SHIPPED_LDAP, "example.ldif")
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "ldap")
# amavisd-new's own schema, verbatim from Debian's package (see tests/fixtures/ldap/README).
AMAVIS_SCHEMA = os.path.join(FIXTURES, "amavis.schema")
IREDMAIL_SCHEMA = os.path.join(FIXTURES, "iredmail-subset.schema")
IREDMAIL_LDIF = os.path.join(FIXTURES, "iredmail.ldif")

SYSTEM_SCHEMAS = "/etc/ldap/schema"
CORE_SCHEMAS = ("core", "cosine", "inetorgperson", "nis")
SLAPD = "/usr/sbin/slapd"
SLAPADD = "/usr/sbin/slapadd"
LDAP_USER = "openldap"
# ldap-utils read neither /etc/ldap/ldap.conf nor ~/.ldaprc.
CLIENT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "LDAPNOINIT": "1"}


# Schema files ---------------------------------------------------------------------------------

@dataclass
class Schema:
    """The definitions of one schema file, as their texts, in file order."""

    attribute_types: list = field(default_factory=list)
    object_classes: list = field(default_factory=list)
    object_identifiers: list = field(default_factory=list)  # "NAME OID"

    def definitions(self):
        """{OID: parsed definition} of the attribute types and object classes (see parse_definition)."""
        parsed = {}
        for text in self.attribute_types + self.object_classes:
            definition = parse_definition(text)
            if definition["OID"] in parsed:
                raise ValueError(f"{definition['OID']} defined twice")
            parsed[definition["OID"]] = definition
        return parsed


_CONF_KEYWORDS = {"attributetype": "attribute_types", "attributetypes": "attribute_types",
                  "objectclass": "object_classes", "objectclasses": "object_classes",
                  "objectidentifier": "object_identifiers"}
_LDIF_ATTRIBUTES = {"olcattributetypes": "attribute_types", "olcobjectclasses": "object_classes",
                    "olcobjectidentifier": "object_identifiers"}


def parse_schema_conf(text):
    """A Schema from slapd.conf-style text (attributetype, objectclass, objectidentifier).

    As slapd.conf reads it: lines starting with # are comments, a line starting
    with white space continues the one before. Other keywords are refused.
    """
    schema = Schema()
    logical = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if line[0].isspace():
            if not logical:
                raise ValueError(f"continuation line with nothing to continue: {line!r}")
            logical[-1] += " " + line.strip()
        else:
            logical.append(line.strip())
    for line in logical:
        keyword, _, value = line.partition(" ")
        try:
            kind = _CONF_KEYWORDS[keyword.lower()]
        except KeyError:
            raise ValueError(f"not a schema statement: {line!r}") from None
        getattr(schema, kind).append(" ".join(value.split()))
    return schema


def ldif_records(text):
    """The records of LDIF text: lists of (attribute, value), lines unfolded, comments dropped.

    Values given base64-encoded (attr:: value) are decoded; URL values (attr:< url)
    and change records are returned as they are.
    """
    records, record, lines = [], [], []
    for line in text.splitlines():
        if line.startswith(" ") and lines:
            lines[-1] += line[1:]
        else:
            lines.append(line)
    for line in lines:
        if not line.strip():
            if record:
                records.append(record)
                record = []
            continue
        if line.startswith("#"):
            continue
        attribute, separator, value = line.partition(":")
        if not separator:
            raise ValueError(f"not an LDIF line: {line!r}")
        if value.startswith(":"):
            value = base64.b64decode(value[1:].strip()).decode("utf-8")
        else:
            value = value.lstrip(" ")
        record.append((attribute, value))
    if record:
        records.append(record)
    return records


def parse_schema_ldif(text):
    """A Schema from the olcSchemaConfig entries of cn=config LDIF text.

    {N} order prefixes (as slapcat writes them) are dropped.
    """
    schema = Schema()
    for record in ldif_records(text):
        classes = {value.lower() for name, value in record if name.lower() == "objectclass"}
        if "olcschemaconfig" not in classes:
            continue
        for name, value in record:
            kind = _LDIF_ATTRIBUTES.get(name.lower())
            if kind:
                getattr(schema, kind).append(" ".join(re.sub(r"^\{\d+\}", "", value).split()))
    return schema


def read_schema(path):
    """A Schema from a .schema (slapd.conf style) or .ldif (cn=config) file."""
    with open(path, encoding="utf-8") as file:
        text = file.read()
    return parse_schema_ldif(text) if path.endswith(".ldif") else parse_schema_conf(text)


_TOKEN = re.compile(r"\(|\)|\$|'(?:[^'\\]|\\.)*'|[^\s()$']+")
_FLAGS = {"SINGLE-VALUE", "COLLECTIVE", "NO-USER-MODIFICATION", "OBSOLETE", "ABSTRACT",
          "STRUCTURAL", "AUXILIARY"}
_LISTS = {"NAME", "SUP", "MUST", "MAY", "AUX", "NOT"}


def parse_definition(text):
    """An RFC 4512 definition "( OID KEYWORD value ... )" as a dict.

    Keys: OID, each keyword given (upper-cased). NAME, SUP, MUST and MAY
    (and the like) are tuples even when one value is given; flags such as
    SINGLE-VALUE or AUXILIARY are True; other values are strings, quotes removed.
    Keyword order and white space do not matter, so equal definitions compare equal.
    """
    tokens = _TOKEN.findall(text)
    if re.sub(r"\s", "", "".join(tokens)) != re.sub(r"\s", "", text):
        raise ValueError(f"unexpected characters in {text!r}")
    if len(tokens) < 3 or tokens[0] != "(" or tokens[-1] != ")":
        raise ValueError(f"not a parenthesised definition: {text!r}")

    def unquote(token):
        return token[1:-1] if token.startswith("'") else token

    definition = {"OID": tokens[1]}
    position, end = 2, len(tokens) - 1
    while position < end:
        keyword = tokens[position].upper()
        position += 1
        if keyword in definition:
            raise ValueError(f"{keyword} given twice in {text!r}")
        if keyword in _FLAGS:
            definition[keyword] = True
            continue
        if position >= end:
            raise ValueError(f"{keyword} has no value in {text!r}")
        if tokens[position] == "(":
            closing = tokens.index(")", position)
            values = tuple(unquote(token) for token in tokens[position + 1:closing]
                           if token != "$")
            position = closing + 1
        else:
            values = (unquote(tokens[position]),)
            position += 1
        definition[keyword] = values if keyword in _LISTS else " ".join(values)
    return definition


def schema_ldif(schema, name):
    """cn=config LDIF text for schema, as the entry cn=NAME,cn=schema,cn=config."""
    lines = [f"dn: cn={name},cn=schema,cn=config", "objectClass: olcSchemaConfig", f"cn: {name}"]
    lines += [f"olcObjectIdentifier: {text}" for text in schema.object_identifiers]
    lines += [f"olcAttributeTypes: {text}" for text in schema.attribute_types]
    lines += [f"olcObjectClasses: {text}" for text in schema.object_classes]
    return "\n".join(lines) + "\n"


def schema_conf(schema):
    """slapd.conf-style text for schema."""
    lines = [f"objectidentifier {text}" for text in schema.object_identifiers]
    lines += [f"attributetype {text}" for text in schema.attribute_types]
    lines += [f"objectclass {text}" for text in schema.object_classes]
    return "\n".join(lines) + "\n"


def ssha(password):
    """An RFC 2307 {SSHA} userPassword value for password (what slappasswd makes)."""
    salt = secrets.token_bytes(8)
    digest = hashlib.sha1(password.encode("utf-8") + salt).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode("ascii")


# The server -----------------------------------------------------------------------------------

CA_CONF = """\
[req]
distinguished_name = dn
prompt = no
x509_extensions = ca
[dn]
CN = milter-manager test CA
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
"""

SERVER_EXTENSIONS = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


class Slapd:
    """A private slapd on 127.0.0.1 (see the module's docstring).

    start() builds the configuration on first use, starts slapd, waits until
    it answers and, the first time only, adds the base tree and ldif; stop()
    SIGTERMs it by PID; restart() starts it again on the same ports with the
    data it had. A start that fails stops whatever it started.
    """

    def __init__(self, tmpdir, ldif=(), schemas=(), tls=False, suffix="dc=example,dc=com",
                 conf_style=False, milter_schema=True):
        self.tmpdir = os.path.abspath(tmpdir)
        self.ldif = [ldif] if isinstance(ldif, str) else list(ldif)
        self.schemas = [os.path.abspath(path) for path in schemas]
        self.tls = tls
        self.conf_style = conf_style
        self.milter_schema = milter_schema
        self.suffix = self.base = suffix
        self._base_entry = _suffix_entry(suffix)
        self.admin_dn = f"cn=admin,{suffix}"
        self.admin_password = "adminpw"
        self.reader_dn = f"cn=reader,{suffix}"
        self.reader_password = "readerpw"
        self.port = free_port()
        self.uri = f"ldap://{HOST}:{self.port}"
        self.tls_port = self.ldaps_uri = self.ca_file = None
        if tls:
            self.tls_port = free_port()
            while self.tls_port == self.port:
                self.tls_port = free_port()
            self.ldaps_uri = f"ldaps://{HOST}:{self.tls_port}"
            self.ca_file = os.path.join(self.tmpdir, "tls", "ca.pem")
        self.run_dir = os.path.join(self.tmpdir, "run")
        self.db_dir = os.path.join(self.tmpdir, "db")
        self.config_dir = os.path.join(self.tmpdir, "slapd.d")
        self.log_path = os.path.join(self.tmpdir, "slapd.log")
        # The ldapi socket's path must fit in sockaddr_un: it is reached through a short link.
        self._link = None
        self.ldapi_uri = None
        self.process = None
        self._built = False
        self._loaded = False

    # Life cycle

    def start(self, timeout=30):
        """Start slapd (building its configuration and data the first time); wait until it answers."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("slapd is already running")
        try:
            if not self._built:
                self._build()
                self._built = True
            self._launch(timeout)
            if not self._loaded:
                self.add(self._base_ldif())
                for text in self.ldif:
                    self.add(text)
                self._loaded = True
            else:
                self._client("ldapwhoami", "-x", "-H", self.uri)
        except BaseException:
            self.stop()
            raise

    def stop(self):
        """SIGTERM slapd by PID and wait for it to exit; remove the ldapi link. Safe to repeat."""
        if self.process is not None:
            if self.process.poll() is None:
                stop_pid(self.process.pid)
            self.process.wait()
        if self._link is not None:
            try:
                os.unlink(self._link)
            except FileNotFoundError:
                pass
            self._link = None

    def restart(self, timeout=30):
        """stop(), then start() on the same ports with the same data (nothing is added again)."""
        self.stop()
        self.start(timeout)

    def log(self):
        """slapd's output so far (all its runs), or "" before the first."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as log:
                return log.read()
        except FileNotFoundError:
            return ""

    # Data

    def add(self, ldif_text):
        """ldapadd ldif_text as the admin; returns ldapadd's output, raises RuntimeError on failure."""
        return self._client("ldapadd", "-x", "-H", self.uri, "-D", self.admin_dn,
                            "-w", self.admin_password, input=ldif_text)

    def modify(self, ldif_text):
        """ldapmodify ldif_text (change records) as the admin; like add()."""
        return self._client("ldapmodify", "-x", "-H", self.uri, "-D", self.admin_dn,
                            "-w", self.admin_password, input=ldif_text)

    def _client(self, *command, input=None):
        result = subprocess.run(command, input=input, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=CLIENT_ENV, timeout=60,
                                check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{command[0]} failed ({result.returncode}): {result.stdout.strip()}")
        return result.stdout

    def _base_ldif(self):
        return (f"{self._base_entry}\n"
                f"dn: {self.reader_dn}\n"
                "objectClass: organizationalRole\n"
                "objectClass: simpleSecurityObject\n"
                "cn: reader\n"
                f"userPassword: {ssha(self.reader_password)}\n"
                "description: read-only bind user\n")

    # Building

    def _build(self):
        user, group = pwd.getpwnam(LDAP_USER).pw_uid, grp.getgrnam(LDAP_USER).gr_gid
        os.makedirs(self.tmpdir, exist_ok=True)
        _make_reachable(self.tmpdir, LDAP_USER)
        for directory in (self.run_dir, self.db_dir, self.config_dir):
            os.makedirs(directory)
            os.chown(directory, user, group)
            os.chmod(directory, 0o750)
        if self.tls:
            self._make_certificates(group)
        if self.conf_style:
            self._write(os.path.join(self.tmpdir, "slapd.conf"), self._conf())
        else:
            path = os.path.join(self.tmpdir, "config.ldif")
            self._write(path, self._config_ldif())
            result = subprocess.run([SLAPADD, "-n0", "-F", self.config_dir, "-l", path],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    timeout=60, check=False)
            if result.returncode != 0:
                raise RuntimeError(f"slapadd -n0 failed ({result.returncode}): {result.stdout}")
            for directory, names, files in os.walk(self.config_dir):
                for name in names + files:
                    os.chown(os.path.join(directory, name), user, group)

    def _write(self, path, text):
        with open(path, "w", encoding="utf-8") as file:
            file.write(text)

    def _schema_files(self, wanted):
        """The schema files to load, each as a path of the wanted kind (.ldif or .schema).

        System and shipped files are used as they are; others of the other kind
        are converted into tmpdir/schema/.
        """
        paths = [os.path.join(SYSTEM_SCHEMAS, f"{name}{wanted}") for name in CORE_SCHEMAS]
        if self.milter_schema:
            paths.append(MILTER_MANAGER_LDIF if wanted == ".ldif" else MILTER_MANAGER_SCHEMA)
        converted = os.path.join(self.tmpdir, "schema")
        for source in [AMAVIS_SCHEMA, *self.schemas]:
            if source.endswith(wanted):
                paths.append(source)
                continue
            os.makedirs(converted, exist_ok=True)
            name = os.path.splitext(os.path.basename(source))[0]
            schema = read_schema(source)
            path = os.path.join(converted, name + wanted)
            self._write(path, schema_ldif(schema, name) if wanted == ".ldif"
                        else schema_conf(schema))
            paths.append(path)
        return paths

    def _tls_settings(self):
        if not self.tls:
            return {}
        directory = os.path.dirname(self.ca_file)
        return {"TLSCACertificateFile": self.ca_file,
                "TLSCertificateFile": os.path.join(directory, "server.pem"),
                "TLSCertificateKeyFile": os.path.join(directory, "server.key")}

    def _config_ldif(self):
        includes = "".join(f"include: {_file_uri(path)}\n" for path in self._schema_files(".ldif"))
        tls = "".join(f"olc{name}: {value}\n" for name, value in self._tls_settings().items())
        return f"""\
dn: cn=config
objectClass: olcGlobal
cn: config
olcPidFile: {self.run_dir}/slapd.pid
olcArgsFile: {self.run_dir}/slapd.args
olcLogLevel: stats
{tls}
dn: cn=module{{0}},cn=config
objectClass: olcModuleList
cn: module{{0}}
olcModulePath: /usr/lib/ldap
olcModuleLoad: back_mdb

dn: cn=schema,cn=config
objectClass: olcSchemaConfig
cn: schema

{includes}
dn: olcDatabase={{-1}}frontend,cn=config
objectClass: olcDatabaseConfig
objectClass: olcFrontendConfig
olcDatabase: {{-1}}frontend

dn: olcDatabase={{0}}config,cn=config
objectClass: olcDatabaseConfig
olcDatabase: {{0}}config
olcAccess: {{0}}to * by dn.exact=gidNumber={os.getgid()}+uidNumber={os.getuid()},cn=peercred,cn=external,cn=auth manage by * break

dn: olcDatabase={{1}}mdb,cn=config
objectClass: olcDatabaseConfig
objectClass: olcMdbConfig
olcDatabase: {{1}}mdb
olcDbDirectory: {self.db_dir}
olcSuffix: {self.suffix}
olcRootDN: {self.admin_dn}
olcRootPW: {ssha(self.admin_password)}
olcDbMaxSize: 104857600
olcDbIndex: objectClass eq
olcDbIndex: mail eq
olcAccess: {{0}}to attrs=userPassword by self write by anonymous auth by * none
olcAccess: {{1}}to * by * read
"""

    def _conf(self):
        includes = "".join(f'include "{path}"\n' for path in self._schema_files(".schema"))
        tls = "".join(f'{name} "{value}"\n' for name, value in self._tls_settings().items())
        return f"""\
{includes}
pidfile "{self.run_dir}/slapd.pid"
argsfile "{self.run_dir}/slapd.args"
loglevel stats
modulepath /usr/lib/ldap
moduleload back_mdb
{tls}
database config
access to * by dn.exact=gidNumber={os.getgid()}+uidNumber={os.getuid()},cn=peercred,cn=external,cn=auth manage by * break

database mdb
directory "{self.db_dir}"
suffix "{self.suffix}"
rootdn "{self.admin_dn}"
rootpw {ssha(self.admin_password)}
maxsize 104857600
index objectClass eq
index mail eq
access to attrs=userPassword by self write by anonymous auth by * none
access to * by * read
"""

    def _make_certificates(self, group):
        """A CA and a server certificate for 127.0.0.1 and localhost; the key readable by slapd."""
        directory = os.path.dirname(self.ca_file)
        os.makedirs(directory)
        os.chown(directory, 0, group)
        os.chmod(directory, 0o750)

        def path(name):
            return os.path.join(directory, name)

        self._write(path("ca.cnf"), CA_CONF)
        self._write(path("server.ext"), SERVER_EXTENSIONS)
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-noenc"]
        commands = [
            ["openssl", "req", "-x509", *ec, "-config", path("ca.cnf"), "-days", "30",
             "-keyout", path("ca.key"), "-out", self.ca_file],
            ["openssl", "req", "-new", *ec, "-subj", "/CN=localhost",
             "-keyout", path("server.key"), "-out", path("server.csr")],
            ["openssl", "x509", "-req", "-in", path("server.csr"), "-CA", self.ca_file,
             "-CAkey", path("ca.key"), "-set_serial", f"0x{secrets.token_hex(8)}",
             "-days", "30", "-extfile", path("server.ext"), "-out", path("server.pem")],
        ]
        for command in commands:
            result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, timeout=60, check=False)
            if result.returncode != 0:
                raise RuntimeError(f"{' '.join(command[:2])} failed: {result.stdout}")
        os.chown(path("server.key"), 0, group)
        os.chmod(path("server.key"), 0o640)

    def _launch(self, timeout):
        self._link = _short_link(self.run_dir, "mm-ldap")
        self.ldapi_uri = "ldapi://" + urllib.parse.quote(os.path.join(self._link, "ldapi"), safe="")
        urls = [f"{self.uri}/", self.ldapi_uri]
        if self.tls:
            urls.append(f"{self.ldaps_uri}/")
        config = (["-f", os.path.join(self.tmpdir, "slapd.conf")] if self.conf_style
                  else ["-F", self.config_dir])
        command = [SLAPD, "-d", "stats", "-h", " ".join(urls), *config,
                   "-u", LDAP_USER, "-g", LDAP_USER]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        try:
            for port in (self.port, self.tls_port):
                if port is not None:
                    wait_for_port(port, timeout, self.process)
        except (RuntimeError, TimeoutError) as error:
            raise RuntimeError(f"slapd: {error}; its log:\n{self.log()[-4000:]}") from None


def _suffix_entry(suffix):
    """The LDIF record of the suffix entry (dc=, o= or ou= first RDN)."""
    rdn = suffix.split(",", 1)[0]
    attribute, _, value = rdn.partition("=")
    attribute = attribute.strip().lower()
    classes = {"dc": ["dcObject", "organization"], "o": ["organization"],
               "ou": ["organizationalUnit"]}.get(attribute)
    if classes is None or not value:
        raise ValueError(f"suffix {suffix!r}: its first RDN must be dc=, o= or ou=")
    lines = [f"dn: {suffix}", *(f"objectClass: {name}" for name in classes),
             f"{attribute}: {value.strip()}"]
    if attribute == "dc":
        lines.append(f"o: {value.strip()}")
    return "\n".join(lines) + "\n"


def _file_uri(path):
    return "file://" + urllib.parse.quote(path)
