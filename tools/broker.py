"""Local mosquitto broker with a generated test CA (TLS listener + plain loopback listener)."""
import datetime
import os
import shutil
import socket
import subprocess
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path, key):
    with open(path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))


def make_ca(directory, cn="micro-ovms test CA", hosts=("localhost",), ips=("127.0.0.1",)):
    """Write ca.pem, server.pem, server.key into directory (EC P-256, like a lean ESP32 setup)."""
    import ipaddress
    os.makedirs(directory, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=3650))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, key_cert_sign=True, crl_sign=True,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    san = [x509.DNSName(h) for h in hosts] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=825))
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {k: os.path.join(directory, k) for k in ("ca.pem", "server.pem", "server.key")}
    with open(paths["ca.pem"], "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(paths["server.pem"], "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(paths["server.key"], key)
    return paths


def mosquitto_path():
    exe = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/sbin:/usr/local/sbin")
    if not exe:
        raise RuntimeError("mosquitto is not installed (run `make deps`, or apt-get install mosquitto)")
    return exe


class Broker:
    """A mosquitto process on loopback: `tls_port` (TLS, test CA) and `port` (plain)."""

    def __init__(self, directory, tls_port=None, port=None, users=None):
        self.dir = os.path.abspath(directory)
        os.makedirs(self.dir, exist_ok=True)
        ca = os.path.join(self.dir, "ca.pem")
        self.certs = {k: os.path.join(self.dir, k) for k in ("ca.pem", "server.pem", "server.key")}
        if not os.path.exists(ca):
            make_ca(self.dir)
        self.ca = ca
        self.tls_port = tls_port or free_port()
        self.port = port or free_port()
        self.users = users or {}
        self.proc = None

    def _conf(self):
        lines = ["per_listener_settings false", "persistence false", "log_dest stdout",
                 # as root mosquitto would drop to its own user, which cannot read a test's
                 # private temp dir: stay who we are (only ever on loopback ports)
                 *(["user root"] if os.geteuid() == 0 else []),
                 "log_type error", "log_type warning", "log_type notice",
                 "max_packet_size 1048576",
                 f"listener {self.port} 127.0.0.1", f"listener {self.tls_port} 127.0.0.1",
                 f"cafile {self.certs['ca.pem']}", f"certfile {self.certs['server.pem']}",
                 f"keyfile {self.certs['server.key']}", "tls_version tlsv1.2"]
        if self.users:
            pw = os.path.join(self.dir, "passwd")
            open(pw, "w").close()
            for u, p in self.users.items():
                subprocess.run([shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd",
                                "-b", pw, u, p], check=True)
            lines += ["allow_anonymous false", f"password_file {pw}"]
        else:
            lines += ["allow_anonymous true"]
        path = os.path.join(self.dir, "mosquitto.conf")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        return path

    def start(self, timeout=10):
        conf = self._conf()
        self.log = open(os.path.join(self.dir, "mosquitto.out"), "ab")
        self.proc = subprocess.Popen([mosquitto_path(), "-c", conf], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                socket.create_connection(("127.0.0.1", self.tls_port), 0.2).close()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError("mosquitto exited: see " + self.log.name)
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self):
        self.stop()
        return self.start()

    def __enter__(self):
        return self.start()

    def __exit__(self, *a):
        self.stop()
