#!/usr/bin/env python3
"""TLS in `qcow2kit serve` (docs/nbd-design.md §1.9, §3, §4 item 8).

The certificates are made at test time with certtool (ECDSA, the §3 recipe): a CA with a
server certificate (cn/dns localhost, ip 127.0.0.1 and ::1), a client certificate, a second
client certificate that a CRL revokes, and an unrelated CA with its own client certificate.
The server requires client certificates (verify-peer=on, qemu's default).

  clients     nbdinfo over nbds+unix:// (text and --json show TLS); qemu-io with
              --object tls-creds-x509,endpoint=client --image-opts (pattern writes/reads,
              a 32 MiB request, FUA, zeroes, aio + flush) replayed on a reference copy;
              qemu-img compare over TLS while serving and of the image after the stop;
              qemu-img map over TLS equals the map from a plain qemu-nbd; nbdcopy -C 4 out
              of and into the export; TLS over a TCP listener; fio's nbd engine randwrite QD32
              with crc32c verify (fio never allows tls-certificates= in its uri, so libnbd
              finds the client credentials in $HOME/.pki/libnbd, which it reads only for a
              non-root user: as root fio runs in a user namespace mapped to another uid).
  refused     a plain qemu-io ("TLS negotiation required") and nbdinfo, a client without a
              certificate, one with the other CA's certificate, a revoked one (ca-crl.pem);
              the server goes on serving good clients.
  raw socket  before STARTTLS: GO, INFO, LIST, SR, meta contexts and unknown options get
              ERR_TLS_REQD (data drained, parsing goes on), EXPORT_NAME and a client without
              FIXED_NEWSTYLE are hard disconnects, STARTTLS with data gets ERR_INVALID, ABORT
              gets ACK; a real STARTTLS with Python's ssl module (also with the ClientHello
              sent in the same write as the STARTTLS option), then a second STARTTLS gets
              ERR_INVALID, unknown options ERR_UNSUP (never TLS_REQD again) and GO, WRITE, READ
              and BLOCK_STATUS work; EXPORT_NAME over TLS; a TLS 1.2 client (with the same
              refusals); garbage or EOF in the TLS handshake closes only that connection, and a
              handshake that stalls is dropped after 10 s (§2.4); without --tls-creds STARTTLS
              gets ERR_POLICY.
  options     --tls-creds DIR (ours) and --object tls-creds-x509,...,endpoint=server
              --tls-creds ID; verify-peer=off accepts a client without a certificate; bad
              credentials (missing directory, missing server-key.pem, junk ca-cert.pem, junk
              ca-crl.pem, endpoint=client, an unknown id) fail at start with exit 1 and a
              message, leaving no socket behind.

Where qemu-nbd 7.2 departs from the design the expectation depends on the flavour (ABORT before
TLS: qemu answers ERR_TLS_REQD; STARTTLS with data: qemu hangs up after ERR_INVALID). Cases
marked "ours only" use the --tls-creds DIR form, which qemu-nbd does not have; --peer skips
them.

Run: python3 tests/test_nbd_tls.py --qcow2kit build/qcow2kit [--peer] [--only SUBSTR]
"""

import json
import os
import random
import shutil
import socket
import ssl
import struct
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nbd_server as NS  # noqa: E402
import qk_testlib as T  # noqa: E402
import test_nbd_hostile as H  # noqa: E402  (the raw-socket client and the wire constants)
from qk_testlib import MiB  # noqa: E402

TIMEOUT = 120
LAZY = {"lazy_refcounts": "on"}
TOOLS = ("certtool", "nbdinfo", "nbdcopy", "qemu-io", "qemu-img", "qemu-nbd")


def tool(*argv, timeout=TIMEOUT, what=None, env=None, cwd=None):
    return T.expect_ok(T.run(list(argv), timeout=timeout, env=env, cwd=cwd), what)


def new_image(tmp, size, cmds=(), name="img"):
    d = tempfile.mkdtemp(prefix=f"{name}-", dir=tmp)
    img = T.QemuTools().create(os.path.join(d, "img.qcow2"), size, **LAZY)
    if cmds:
        T.QemuTools().io(img, cmds)
    return img


# --------------------------------------------------------------------------------------
# Certificates (design §3)
# --------------------------------------------------------------------------------------

CA_TEMPLATE = "cn = {cn}\nca\ncert_signing_key\nexpiration_days = 7\n"
SERVER_TEMPLATE = ("cn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\n"
                   "ip_address = ::1\ntls_www_server\nencryption_key\nsigning_key\n"
                   "expiration_days = 7\n")
CLIENT_TEMPLATE = "cn = {cn}\ntls_www_client\nencryption_key\nsigning_key\nexpiration_days = 7\n"
CRL_TEMPLATE = "crl_next_update = 7\ncrl_number = 1\n"


class Pki:
    """Credential directories, each laid out as qemu's tls-creds-x509 expects:

      srv      ca-cert.pem, server-cert.pem, server-key.pem   (the server)
      srv_crl  the same + ca-crl.pem revoking the `revoked` client
      cli      ca-cert.pem, client-cert.pem, client-key.pem   (a good client)
      revoked  a client certificate of the same CA, listed in the CRL
      nocert   ca-cert.pem only (a client that trusts the server but has no certificate)
      other    ca-cert.pem of our CA + a client certificate of the unrelated CA
      nokey    ca-cert.pem, server-cert.pem: server-key.pem is missing
      junkca   srv with a ca-cert.pem that is not a certificate
      junkcrl  srv with a ca-crl.pem that is not a CRL
      home     a $HOME whose .pki/libnbd is a copy of cli (for fio)
    """

    def __init__(self, root):
        os.makedirs(root)
        self.root = root
        w = self.work = os.path.join(root, "work")
        os.mkdir(w)
        self._ca("ca", "qcow2kit test CA")
        self._ca("ca2", "unrelated test CA")
        self._cert("server", "ca", SERVER_TEMPLATE)
        self._cert("client", "ca", CLIENT_TEMPLATE.format(cn="client"))
        self._cert("revoked", "ca", CLIENT_TEMPLATE.format(cn="revoked client"))
        self._cert("other", "ca2", CLIENT_TEMPLATE.format(cn="client of another CA"))
        self._write("crl.info", CRL_TEMPLATE)
        self._certtool("--generate-crl", "--load-ca-privkey", "ca-key.pem",
                       "--load-ca-certificate", "ca-cert.pem", "--load-certificate",
                       "revoked-cert.pem", "--template", "crl.info", "--outfile", "ca-crl.pem")

        ca = ("ca-cert.pem", "ca-cert.pem")
        server = [ca, ("server-cert.pem", "server-cert.pem"), ("server-key.pem", "server-key.pem")]
        self.srv = self._dir("srv", server)
        self.srv_crl = self._dir("srv-crl", server + [("ca-crl.pem", "ca-crl.pem")])
        self.cli = self._dir("cli", [ca, ("client-cert.pem", "client-cert.pem"),
                                     ("client-key.pem", "client-key.pem")])
        self.revoked = self._dir("revoked", [ca, ("revoked-cert.pem", "client-cert.pem"),
                                             ("revoked-key.pem", "client-key.pem")])
        self.nocert = self._dir("nocert", [ca])
        self.other = self._dir("other", [ca, ("other-cert.pem", "client-cert.pem"),
                                         ("other-key.pem", "client-key.pem")])
        self.nokey = self._dir("nokey", server[:2])
        self.junkca = self._dir("junkca", server[1:])
        with open(os.path.join(self.junkca, "ca-cert.pem"), "w") as f:
            f.write("this is not a certificate\n")
        self.junkcrl = self._dir("junkcrl", server)
        with open(os.path.join(self.junkcrl, "ca-crl.pem"), "w") as f:
            f.write("-----BEGIN X509 CRL-----\nbm90IGEgQ1JM!!\n-----END X509 CRL-----\n")
        self.home = os.path.join(root, "home")
        shutil.copytree(self.cli, os.path.join(self.home, ".pki", "libnbd"))

    def _write(self, name, text):
        with open(os.path.join(self.work, name), "w") as f:
            f.write(text)

    def _certtool(self, *argv):
        tool("certtool", *argv, cwd=self.work, what="certtool failed")

    def _key(self, name):
        self._certtool("--generate-privkey", "--key-type=ecdsa", "--outfile", f"{name}-key.pem")

    def _ca(self, name, cn):
        self._key(name)
        self._write(f"{name}.info", CA_TEMPLATE.format(cn=cn))
        self._certtool("--generate-self-signed", "--load-privkey", f"{name}-key.pem",
                       "--template", f"{name}.info", "--outfile", f"{name}-cert.pem")

    def _cert(self, name, ca, template):
        self._key(name)
        self._write(f"{name}.info", template)
        self._certtool("--generate-certificate", "--load-ca-privkey", f"{ca}-key.pem",
                       "--load-ca-certificate", f"{ca}-cert.pem", "--load-privkey",
                       f"{name}-key.pem", "--template", f"{name}.info", "--outfile",
                       f"{name}-cert.pem")

    def _dir(self, name, files):
        d = os.path.join(self.root, name)
        os.mkdir(d)
        for src, dst in files:
            shutil.copyfile(os.path.join(self.work, src), os.path.join(d, dst))
        return d


# --------------------------------------------------------------------------------------
# Server options and clients
# --------------------------------------------------------------------------------------

def object_args(srvdir, verify_peer=None, endpoint="server", oid="tls0", creds_id="tls0"):
    obj = f"tls-creds-x509,id={oid},dir={srvdir},endpoint={endpoint}"
    if verify_peer is not None:
        obj += f",verify-peer={verify_peer}"
    return ["--object", obj, "--tls-creds", creds_id]


def tls_args(S, srvdir):
    """Require TLS with the credentials in srvdir: ours takes the directory itself, qemu-nbd
    only the --object form."""
    return object_args(srvdir) if S.peer else ["--tls-creds", srvdir]


def qemu_image_opts(clidir, sock=None, tcp=None):
    """qemu's client side of TLS: ([options], image-opts string). Over a unix socket there is
    no host name to check the certificate against, so tls-hostname is given."""
    where = (f"server.type=unix,server.path={sock},tls-hostname=localhost" if tcp is None
             else f"server.type=inet,server.host={tcp[0]},server.port={tcp[1]}")
    return (["--object", f"tls-creds-x509,id=tls0,dir={clidir},endpoint=client",
             "--image-opts"], f"driver=nbd,{where},tls-creds=tls0")


def qemu_io_tls(clidir, cmds, sock=None, tcp=None, ok=True):
    opts, image = qemu_image_opts(clidir, sock, tcp)
    argv = ["qemu-io", *opts]
    for c in cmds:
        argv += ["-c", c]
    res = T.run(argv + [image], timeout=TIMEOUT)
    if ok and (res.rc != 0 or "failed" in res.text or "failed" in res.err):
        T.fail("qemu-io over TLS failed:\n" + res.describe())
    return res


def nbdinfo_json(uri):
    res = tool("nbdinfo", "--json", uri)
    try:
        return json.loads(res.out)
    except ValueError as e:
        T.fail(f"nbdinfo printed no JSON ({e}):\n{res.describe()}")


def check_tls_info(uri, size, what="nbdinfo over TLS"):
    text = tool("nbdinfo", uri, what=what).text
    T.check("newstyle-fixed with TLS" in text, f"{what}: no TLS in the protocol line:\n{text}")
    info = nbdinfo_json(uri)
    T.check_eq((info.get("protocol"), info.get("TLS"), info.get("structured")),
               ("newstyle-fixed", True, True), f"{what}: protocol, TLS, structured")
    T.check_eq(info["exports"][0]["export-size"], size, f"{what}: export-size")


def expect_refused(res, what, keywords=()):
    """A client that must not get in: exit status 1, nothing read or written."""
    T.expect_no_crash(res, what, allowed_rc=(1,))
    T.check(res.rc == 1, f"{what}: the client got in:\n{res.describe()}")
    T.check(not any(w in res.text for w in ("wrote ", "read ", "export-size")),
            f"{what}: the client did I/O:\n{res.describe()}")
    if keywords:
        T.check(any(k in res.err for k in keywords),
                f"{what}: stderr mentions none of {list(keywords)}:\n{res.describe()}")


def ssl_context(certdir, with_cert=True, max_version=None):
    """Python's TLS client: trusts certdir/ca-cert.pem, presents certdir/client-cert.pem if
    there is one, checks the server's name."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if max_version is not None:
        ctx.maximum_version = max_version
    ctx.load_verify_locations(os.path.join(certdir, "ca-cert.pem"))
    cert = os.path.join(certdir, "client-cert.pem")
    if with_cert and os.path.exists(cert):
        ctx.load_cert_chain(cert, os.path.join(certdir, "client-key.pem"))
    return ctx


def starttls(c, certdir, max_version=None):
    """STARTTLS (ACK) and the TLS handshake on a raw client; its socket becomes TLS."""
    rtype, replies = c.option(H.OPT_STARTTLS)
    T.check_eq(hex(rtype), hex(H.REP_ACK), f"STARTTLS answer {replies}")
    c.s = ssl_context(certdir, max_version=max_version).wrap_socket(
        c.s, server_hostname="localhost")
    T.check(c.s.version() in ("TLSv1.2", "TLSv1.3"), f"TLS version {c.s.version()}")
    return c


def expect_tls_refused(sock, certdir, what, max_version=None):
    """STARTTLS with these credentials must end in a closed connection, during the handshake
    or (TLS 1.3: the client finishes first) before any answer to the next option."""
    with H.Client(sock) as c:
        c.start()
        rtype, _ = c.option(H.OPT_STARTTLS)
        T.check_eq(hex(rtype), hex(H.REP_ACK), f"{what}: STARTTLS answer")
        try:
            c.s = ssl_context(certdir, max_version=max_version).wrap_socket(
                c.s, server_hostname="localhost")
            c.send_option(H.OPT_GO, H.info_data(""))
            got = c.drain_until_closed()
        except (ssl.SSLError, OSError, H.Closed):
            return
        T.check(not got, f"{what}: the server answered over TLS: {got[:64].hex()}")


class BioSocket:
    """TLS through an ssl.SSLObject over a plain socket, with the socket methods the raw
    client uses; lets a test put bytes of the handshake where it wants them."""

    def __init__(self, raw, obj, incoming, outgoing):
        self.raw, self.obj, self.inc, self.out = raw, obj, incoming, outgoing

    def _flush(self):
        data = self.out.read()
        if data:
            self.raw.sendall(data)

    def _fill(self):
        chunk = self.raw.recv(1 << 16)
        if chunk:
            self.inc.write(chunk)
        else:
            self.inc.write_eof()
        return bool(chunk)

    def handshake(self):
        while True:
            try:
                self.obj.do_handshake()
                self._flush()
                return
            except ssl.SSLWantReadError:
                self._flush()
                if not self._fill():
                    raise H.Closed("EOF in the TLS handshake")

    def sendall(self, data):
        self.obj.write(data)
        self._flush()

    def recv(self, n):
        while True:
            try:
                return self.obj.read(n)
            except ssl.SSLWantReadError:
                self._flush()
                if not self._fill():
                    return b""
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""

    def settimeout(self, t):
        self.raw.settimeout(t)

    def gettimeout(self):
        return self.raw.gettimeout()

    def close(self):
        self.raw.close()


# --------------------------------------------------------------------------------------
# Cases: real clients
# --------------------------------------------------------------------------------------

QEMU_IO_SCRIPT = [
    "write -P 0xab 0 64k", "read -P 0xab 0 64k", "write -f -P 0xcd 1M 4k",
    "write -P 0x99 2M 1M", "write -z 2M 1M", "read -P 0 2M 1M",
    "aio_write -P 0x11 6M 4k", "aio_write -P 0x12 6148k 3k", "aio_flush",
    "write -P 0x13 7M 511", "read -P 0x13 7M 511",
    "write -P 0x5c 8M 32M", "read -P 0x5c 8M 32M",  # one 32 MiB request each way
    "flush", "read -P 0x11 6M 4k",
]


def case_nbdinfo(S, pki, tmp):
    with S.under_test(new_image(tmp, 64 * MiB), *tls_args(S, pki.srv)) as srv:
        check_tls_info(NS.nbds_uri(srv.sock, pki.cli), 64 * MiB)


def case_qemu_io(S, pki, tmp):
    img = new_image(tmp, 64 * MiB, ["write -P 0x77 0 8M"])
    ref = NS.copy_image(img, img + ".ref")
    with S.under_test(img, *tls_args(S, pki.srv)) as srv:
        qemu_io_tls(pki.cli, QEMU_IO_SCRIPT, sock=srv.sock)
        T.QemuTools().io(ref, QEMU_IO_SCRIPT)
        opts, image = qemu_image_opts(pki.cli, srv.sock)
        tool("qemu-img", "compare", *opts, image,
             f"driver=qcow2,file.driver=file,file.filename={ref}",
             what="qemu-img compare over TLS: the export and the reference differ")
    tool("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", img, ref,
         what="the image after the stop and the reference differ")


def case_qemu_img_map(S, pki, tmp):
    img = new_image(tmp, 16 * MiB, ["write -P 0x11 0 2M", "write -z 4M 1M",
                                    "write -P 0x22 8M 64k"])
    ref = NS.copy_image(img, img + ".ref")
    with S.under_test(img, "-r", *tls_args(S, pki.srv)) as srv, S.reference(ref, "-r") as plain:
        opts, image = qemu_image_opts(pki.cli, srv.sock)
        got = json.loads(tool("qemu-img", "map", "--output=json", *opts, image).out)
        want = T.QemuTools().map(plain.uri, extra=("-f", "raw"))
        T.check_json_eq(got, want, "qemu-img map over TLS vs a plain qemu-nbd")


def case_nbdcopy_out(S, pki, tmp):
    img = new_image(tmp, 48 * MiB, ["write -P 0x31 0 5M", "write -P 0x32 17M 3M",
                                    "write -z 30M 1M", "write -P 0x33 40M 64k"])
    out = img + ".out.raw"
    with S.under_test(img, "-r", *tls_args(S, pki.srv)) as srv:
        tool("nbdcopy", "-C", "4", NS.nbds_uri(srv.sock, pki.cli), out)
    tool("qemu-img", "compare", "-f", "raw", "-F", "qcow2", out, img,
         what="nbdcopy's copy over TLS and the image differ")


def case_nbdcopy_in(S, pki, tmp):
    size = 48 * MiB
    img = new_image(tmp, size, ["write -P 0x77 0 48M"])
    src = img + ".src.raw"
    rnd = random.Random(5)
    with open(src, "wb") as f:
        f.truncate(size)
        for off in range(0, size, MiB):
            kind = rnd.choice(["data", "data", "hole", "zeros"])
            f.seek(off)
            if kind == "data":
                f.write(rnd.randbytes(MiB))
            elif kind == "zeros":
                f.write(bytes(MiB))
    with S.under_test(img, *tls_args(S, pki.srv)) as srv:
        tool("nbdcopy", "-C", "4", "--flush", src, NS.nbds_uri(srv.sock, pki.cli))
    tool("qemu-img", "compare", "-f", "raw", "-F", "qcow2", src, img,
         what="the source and the image written by nbdcopy over TLS differ")


def case_tcp(S, pki, tmp):
    img = new_image(tmp, 16 * MiB)
    tcp = ("127.0.0.1", NS.free_tcp_port())
    with S.under_test(img, *tls_args(S, pki.srv), tcp=tcp) as srv:
        uri = f"nbds://{tcp[0]}:{tcp[1]}/?tls-certificates={pki.cli}"
        check_tls_info(uri, 16 * MiB, "nbdinfo over TLS on TCP")
        qemu_io_tls(pki.cli, ["write -P 0x61 1M 64k", "read -P 0x61 1M 64k"], tcp=tcp)
        expect_refused(T.run(["qemu-io", "-f", "raw", "-c", "read 0 4k", srv.uri],
                             timeout=TIMEOUT), "plain qemu-io on TCP", ["TLS negotiation"])
    T.QemuTools().io(img, ["read -P 0x61 1M 64k"])


def case_refused(S, pki, tmp):
    img = new_image(tmp, 16 * MiB, ["write -P 0x5a 0 1M"])
    with S.under_test(img, *tls_args(S, pki.srv)) as srv:
        sock = srv.sock
        res = T.run(["qemu-io", "-f", "raw", "-c", "read 0 4k", srv.uri], timeout=TIMEOUT)
        expect_refused(res, "qemu-io without TLS", ["TLS negotiation required"])
        expect_refused(T.run(["nbdinfo", srv.uri], timeout=TIMEOUT), "nbdinfo without TLS")
        expect_refused(T.run(["nbdinfo", NS.nbds_uri(sock, pki.nocert)], timeout=TIMEOUT),
                       "nbdinfo without a client certificate")
        expect_refused(qemu_io_tls(pki.nocert, ["read 0 4k"], sock=sock, ok=False),
                       "qemu-io without a client certificate")
        expect_refused(T.run(["nbdinfo", NS.nbds_uri(sock, pki.other)], timeout=TIMEOUT),
                       "nbdinfo with a certificate of another CA")
        expect_tls_refused(sock, pki.other, "raw TLS with a certificate of another CA")
        expect_tls_refused(sock, pki.nocert, "raw TLS without a certificate")
        T.check(srv.alive(), f"{S.name} died")
        # Good clients are still served.
        check_tls_info(NS.nbds_uri(sock, pki.cli), 16 * MiB, "nbdinfo after the refusals")
        qemu_io_tls(pki.cli, ["read -P 0x5a 0 1M", "write -P 0x5b 2M 64k"], sock=sock)
        with H.Client(sock) as c:
            starttls(c.start(), pki.cli)
            c.structured_reply()
            T.check_eq(c.go()[0], H.REP_ACK, "GO over TLS after the refusals")
            T.check_eq(c.read(2 * MiB, 4096), b"\x5b" * 4096, "READ over TLS")
            c.disconnect()
    T.QemuTools().io(img, ["read -P 0x5a 0 1M", "read -P 0x5b 2M 64k"])


def case_crl(S, pki, tmp):
    srv_args = object_args(pki.srv_crl) if S.peer else ["--tls-creds", pki.srv_crl]
    with S.under_test(new_image(tmp, 16 * MiB), *srv_args) as srv:
        expect_refused(T.run(["nbdinfo", NS.nbds_uri(srv.sock, pki.revoked)], timeout=TIMEOUT),
                       "nbdinfo with a revoked certificate")
        expect_tls_refused(srv.sock, pki.revoked, "raw TLS with a revoked certificate")
        check_tls_info(NS.nbds_uri(srv.sock, pki.cli), 16 * MiB, "nbdinfo, not revoked")


def case_object_form(S, pki, tmp, verify_peer):
    with S.under_test(new_image(tmp, 16 * MiB),
                      *object_args(pki.srv, verify_peer)) as srv:
        uri = NS.nbds_uri(srv.sock, pki.cli)
        check_tls_info(uri, 16 * MiB, "nbdinfo with a certificate")
        qemu_io_tls(pki.cli, ["write -P 0x41 0 64k", "read -P 0x41 0 64k"], sock=srv.sock)
        nocert = NS.nbds_uri(srv.sock, pki.nocert)
        if verify_peer == "off":
            check_tls_info(nocert, 16 * MiB, "nbdinfo without a certificate, verify-peer=off")
            qemu_io_tls(pki.nocert, ["read -P 0x41 0 64k"], sock=srv.sock)
            with H.Client(srv.sock) as c:
                c.start()
                rtype, _ = c.option(H.OPT_STARTTLS)
                T.check_eq(rtype, H.REP_ACK, "STARTTLS")
                c.s = ssl_context(pki.nocert).wrap_socket(c.s, server_hostname="localhost")
                T.check_eq(c.go()[0], H.REP_ACK, "GO over TLS without a certificate")
                T.check_eq(c.read(0, 4096), b"\x41" * 4096, "READ over TLS")
                c.disconnect()
        else:
            expect_refused(T.run(["nbdinfo", nocert], timeout=TIMEOUT),
                           "nbdinfo without a certificate")
            expect_tls_refused(srv.sock, pki.nocert, "raw TLS without a certificate")
        expect_refused(T.run(["qemu-io", "-f", "raw", "-c", "read 0 4k", srv.uri],
                             timeout=TIMEOUT), "qemu-io without TLS", ["TLS negotiation"])


def fio_runner(pki):
    """(argv prefix, env) that make libnbd in fio read $HOME/.pki/libnbd: only done for a
    non-root user, so root runs fio in a user namespace mapped to another uid. None if that
    is impossible here."""
    env = dict(os.environ, HOME=pki.home)
    if os.geteuid() != 0:
        return [], env
    prefix = ["unshare", "--user", "--map-user=65534", "--map-group=65534"]
    if shutil.which("unshare") and T.run([*prefix, "true"], timeout=30).rc == 0:
        return prefix, env
    return None


def case_fio(S, pki, tmp):
    if not shutil.which("fio"):
        T.skip("fio is not installed")
    runner = fio_runner(pki)
    if runner is None:
        T.skip("running as root and no user namespace for libnbd's non-root certificate "
               "lookup")
    prefix, env = runner
    img = new_image(tmp, 64 * MiB, name="fio")
    out = img + ".json"
    with S.under_test(img, *tls_args(S, pki.srv)) as srv:
        uri = f"nbds+unix:///?socket={srv.sock}"  # TLS required; credentials from $HOME
        res = T.run([*prefix, "fio", "--name=v", "--ioengine=nbd", f"--uri={uri}",
                     "--rw=randwrite", "--bs=4k", "--iodepth=32", "--size=64m",
                     "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
                     "--verify_state_save=0", "--output-format=json", f"--output={out}"],
                    timeout=TIMEOUT, env=env, cwd=os.path.dirname(img))
        T.expect_ok(res, "fio over TLS failed")
        with open(out) as f:
            jobs = json.load(f)["jobs"]
        T.check_eq(len(jobs), 1, "fio jobs")
        j = jobs[0]
        T.check_eq(j["error"], 0, "fio job error")
        T.check(j["write"]["io_bytes"] == 64 * MiB and j["read"]["io_bytes"] == 64 * MiB,
                f"fio wrote {j['write']['io_bytes']} and verified {j['read']['io_bytes']} "
                "bytes (expected 64 MiB each)")


# --------------------------------------------------------------------------------------
# Cases: raw socket (design §1.9)
# --------------------------------------------------------------------------------------

ACK_ABORT = struct.pack(">QIII", H.OPT_REPLY_MAGIC, H.OPT_ABORT, H.REP_ACK, 0)


def raw_cases(S, pki, sock):
    """[(name, fn)] against a TLS server on `sock` (16 MiB export)."""
    cases = []

    def case(fn):
        cases.append(("tls/raw/" + fn.__name__.replace("_", "-"), fn))
        return fn

    @case
    def before_starttls_tls_reqd():
        with H.Client(sock) as c:
            c.start()
            for opt, data, what in (
                    (H.OPT_GO, H.info_data(""), "GO"),
                    (H.OPT_INFO, H.info_data("", [H.INFO_BLOCK_SIZE]), "INFO"),
                    (H.OPT_GO, H.info_data("no-such-export"), "GO of an unknown export"),
                    (H.OPT_LIST, b"", "LIST"),
                    (H.OPT_STRUCTURED_REPLY, b"", "STRUCTURED_REPLY"),
                    (H.OPT_LIST_META_CONTEXT, H.meta_data("", []), "LIST_META_CONTEXT"),
                    (H.OPT_SET_META_CONTEXT, H.meta_data("", ["base:allocation"]),
                     "SET_META_CONTEXT"),
                    (H.OPT_PEEK_EXPORT, b"", "PEEK_EXPORT"),
                    (H.OPT_EXTENDED_HEADERS, b"", "EXTENDED_HEADERS"),
                    (0x4242, b"junk" * 100, "unknown option 0x4242"),
                    (0xFFFFFFFF, b"\0" * 70000, "unknown option 0xffffffff with 70000 bytes")):
                c.expect_option_error(opt, data, H.ERR_TLS_REQD, f"{what} before STARTTLS")
            # Parsing went on: STARTTLS still works, and then everything else.
            starttls(c, pki.cli)
            c.structured_reply()
            T.check_eq(c.set_meta(["base:allocation"]), {"base:allocation": 0},
                       "SET_META_CONTEXT over TLS")
            T.check_eq(c.go()[0], H.REP_ACK, "GO over TLS")
            T.check_eq(c.read(0, 4096), bytes(4096), "READ over TLS")
            c.disconnect()

    @case
    def export_name_before_starttls():
        for flags in (H.FLAG_FIXED_NEWSTYLE | H.FLAG_NO_ZEROES, H.FLAG_FIXED_NEWSTYLE):
            with H.Client(sock) as c:
                c.start(flags)
                c.send_option(H.OPT_EXPORT_NAME, b"")
                c.expect_drop(f"EXPORT_NAME before STARTTLS (client flags {flags})")

    @case
    def export_name_after_tls_reqd():
        with H.Client(sock) as c:
            c.start()
            c.expect_option_error(H.OPT_GO, H.info_data(""), H.ERR_TLS_REQD, "GO")
            c.send_option(H.OPT_EXPORT_NAME, b"")
            c.expect_drop("EXPORT_NAME before STARTTLS, after a refused GO")

    @case
    def not_fixed_newstyle():
        for opt, data in ((H.OPT_STARTTLS, b""), (H.OPT_GO, H.info_data(""))):
            with H.Client(sock) as c:
                c.start(H.FLAG_NO_ZEROES)
                try:
                    c.send_option(opt, data)
                except OSError:
                    pass
                c.expect_drop(f"option {opt} from a client without FIXED_NEWSTYLE")

    @case
    def starttls_with_data():
        with H.Client(sock) as c:
            c.start()
            c.expect_option_error(H.OPT_STARTTLS, b"x", H.ERR_INVALID, "STARTTLS with data")
            if S.peer:  # qemu-nbd 7.2 hangs up after that ERR_INVALID
                c.expect_drop("after STARTTLS with data")
                return
            c.expect_option_error(H.OPT_GO, H.info_data(""), H.ERR_TLS_REQD,
                                  "GO after a refused STARTTLS")
            starttls(c, pki.cli)
            T.check_eq(c.go()[0], H.REP_ACK, "GO over TLS")
            c.disconnect()

    @case
    def abort_before_starttls():
        with H.Client(sock) as c:
            c.start()
            c.send_option(H.OPT_ABORT)
            got = c.drain_until_closed()
            if S.peer:  # qemu-nbd 7.2 answers ERR_TLS_REQD and hangs up
                T.check(len(got) >= 20, f"answer to ABORT: {got.hex()}")
                T.check_eq(hex(struct.unpack(">QIII", got[:20])[2]), hex(H.ERR_TLS_REQD),
                           "qemu-nbd's answer to ABORT before TLS")
            else:  # design §1.9: ABORT -> ACK and close
                T.check_eq(got, ACK_ABORT, "answer to ABORT before STARTTLS")

    @case
    def starttls_then_options():
        with H.Client(sock) as c:
            c.start()
            starttls(c, pki.cli)
            c.expect_option_error(H.OPT_STARTTLS, b"", H.ERR_INVALID, "a second STARTTLS")
            c.expect_option_error(H.OPT_STARTTLS, b"x", H.ERR_INVALID,
                                  "a second STARTTLS with data")
            for opt, data in ((0x4242, b"junk" * 100), (H.OPT_EXTENDED_HEADERS, b"")):
                c.expect_option_error(opt, data, H.ERR_UNSUP,
                                      f"unknown option {opt:#x} over TLS (never TLS_REQD)")
            rtype, replies = c.option(H.OPT_LIST)
            T.check_eq([t for t, _ in replies], [H.REP_SERVER, H.REP_ACK], "LIST over TLS")
            rtype, infos = c.go("", [H.INFO_BLOCK_SIZE], opt=H.OPT_INFO)
            T.check_eq(rtype, H.REP_ACK, "INFO over TLS")
            c.structured_reply()
            T.check_eq(c.set_meta(["base:allocation"]), {"base:allocation": 0},
                       "SET_META_CONTEXT over TLS")
            T.check_eq(c.go()[0], H.REP_ACK, "GO over TLS")
            T.check_eq(c.size, 16 * MiB, "export size over TLS")
            data = random.Random(3).randbytes(MiB + 4096)
            c.write(3 * MiB, data)
            T.check_eq(c.read(3 * MiB, len(data)), data, "1 MiB + 4k read back over TLS")
            T.check_eq(c.read(4 * MiB + 8192, 4096), bytes(4096), "READ of a hole over TLS")
            r = c.call(H.CMD_BLOCK_STATUS, 0, 8 * MiB)
            T.check_eq(r.error, 0, f"BLOCK_STATUS over TLS: {r}")
            T.check(0 in r.extents and r.extents[0], f"BLOCK_STATUS extents: {r}")
            T.check_eq(c.call(H.CMD_FLUSH).error, 0, "FLUSH over TLS")
            c.request(H.CMD_DISC)
            c.expect_drop("DISC over TLS", allow_bytes=True)  # a TLS close_notify may come

    @case
    def starttls_pipelined_client_hello():
        # The ClientHello goes out in the same write as the STARTTLS option, before the ACK:
        # the server must keep those bytes for the TLS layer (§1.9).
        with H.Client(sock) as c:
            c.start()
            inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
            obj = ssl_context(pki.cli).wrap_bio(inc, out, server_hostname="localhost")
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
            hello = out.read()
            T.check(hello[:1] == b"\x16", f"no ClientHello: {hello[:8].hex()}")
            c.send(struct.pack(">QII", H.IHAVEOPT, H.OPT_STARTTLS, 0) + hello)
            rtype, _ = c.option_reply(H.OPT_STARTTLS)
            T.check_eq(hex(rtype), hex(H.REP_ACK), "STARTTLS answer")
            b = BioSocket(c.s, obj, inc, out)
            b.handshake()
            c.s = b
            c.structured_reply()
            T.check_eq(c.go()[0], H.REP_ACK, "GO over TLS")
            T.check_eq(c.read(0, 4096), bytes(4096), "READ over TLS")
            c.disconnect()

    @case
    def handshake_garbage():
        for junk in (b"GET / HTTP/1.0\r\n\r\n" + b"x" * 200,
                     b"\x16\x03\x01\xff\xff" + b"\0" * 100):  # a record longer than allowed
            with H.Client(sock) as c:
                c.start()
                T.check_eq(c.option(H.OPT_STARTTLS)[0], H.REP_ACK, "STARTTLS")
                c.send(junk)
                c.expect_drop(f"junk {junk[:8]!r} in the TLS handshake", allow_bytes=True)

    @case
    def handshake_eof():
        for cut in (0, 5, 40):
            with H.Client(sock) as c:
                c.start()
                inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
                obj = ssl_context(pki.cli).wrap_bio(inc, out, server_hostname="localhost")
                try:
                    obj.do_handshake()
                except ssl.SSLWantReadError:
                    pass
                hello = out.read()
                T.check_eq(c.option(H.OPT_STARTTLS)[0], H.REP_ACK, "STARTTLS")
                c.send(hello[:cut])
                c.s.shutdown(socket.SHUT_WR)
                c.expect_drop(f"EOF after {cut} bytes of the ClientHello", allow_bytes=True)

    @case
    def tls_1_2():
        with H.Client(sock) as c:
            starttls(c.start(), pki.cli, ssl.TLSVersion.TLSv1_2)
            T.check_eq(c.s.version(), "TLSv1.2", "TLS version")
            c.structured_reply()
            T.check_eq(c.go()[0], H.REP_ACK, "GO over TLS 1.2")
            c.write(5 * MiB, b"\x12" * 65536)
            T.check_eq(c.read(5 * MiB, 65536), b"\x12" * 65536, "READ over TLS 1.2")
            c.disconnect()
        expect_tls_refused(sock, pki.nocert, "TLS 1.2 without a client certificate",
                           ssl.TLSVersion.TLSv1_2)
        expect_tls_refused(sock, pki.other, "TLS 1.2 with a certificate of another CA",
                           ssl.TLSVersion.TLSv1_2)

    @case
    def export_name_over_tls():
        for flags, tail in ((H.FLAG_FIXED_NEWSTYLE | H.FLAG_NO_ZEROES, 0),
                            (H.FLAG_FIXED_NEWSTYLE, 124)):
            with H.Client(sock) as c:
                starttls(c.start(flags), pki.cli)
                c.send_option(H.OPT_EXPORT_NAME, b"")
                size, tflags = struct.unpack(">QH", c.recv_exact(10))
                T.check_eq(size, 16 * MiB, "export size after EXPORT_NAME over TLS")
                T.check_eq(c.recv_exact(tail), bytes(tail), "padding after EXPORT_NAME")
                T.check(tflags & H.TF_HAS_FLAGS, f"transmission flags 0x{tflags:x}")
                T.check_eq(c.read(0, 4096), bytes(4096), "READ after EXPORT_NAME over TLS")
                c.disconnect()

    @case
    def no_client_certificate():
        expect_tls_refused(sock, pki.nocert, "raw TLS without a client certificate")

    @case
    def other_ca_certificate():
        expect_tls_refused(sock, pki.other, "raw TLS with a certificate of another CA")

    return cases


def case_raw(S, pki, tmp, R):
    img = new_image(tmp, 16 * MiB, name="raw")
    try:
        with S.under_test(img, *tls_args(S, pki.srv)) as srv:
            for name, fn in raw_cases(S, pki, srv.sock):
                with R.case(name):
                    fn()
                    T.check(srv.alive(), f"{S.name} died")
            with R.case("tls/raw/still-serves"):
                check_tls_info(NS.nbds_uri(srv.sock, pki.cli), 16 * MiB)
                qemu_io_tls(pki.cli, ["read -P 0 0 64k"], sock=srv.sock)
    except T.Failure as e:
        with R.case("tls/raw/server-start-stop"):
            raise e
    else:
        with R.case("tls/raw/server-start-stop"):
            pass


HANDSHAKE_LIMIT = 10  # design §2.4; qemu-nbd 7.2.22 here also drops the client after 10 s


def case_handshake_stall(S, pki, tmp):
    """Clients that stall inside the TLS handshake are dropped after the handshake time limit,
    while a good client is served meanwhile."""
    with S.under_test(new_image(tmp, 16 * MiB), *tls_args(S, pki.srv)) as srv:
        stalls = {
            "nothing after the STARTTLS ACK": b"",
            "a ClientHello header promising 64 KiB": b"\x16\x03\x01\x00\x10" + b"\x01" * 16,
            "half of a 512-byte record": b"\x16\x03\x01\x02\x00" + b"\x01" * 256,
        }
        clients = {}
        try:
            for what, junk in stalls.items():
                c = clients[what] = H.Client(srv.sock, timeout=HANDSHAKE_LIMIT + 10)
                c.start()
                T.check_eq(c.option(H.OPT_STARTTLS)[0], H.REP_ACK, "STARTTLS")
                c.send(junk)
            t0 = time.monotonic()
            check_tls_info(NS.nbds_uri(srv.sock, pki.cli), 16 * MiB,
                           "nbdinfo while other clients stall in the TLS handshake")
            for what, c in clients.items():
                left = HANDSHAKE_LIMIT + 10 - (time.monotonic() - t0)
                try:
                    c.drain_until_closed(max(left, 1))
                except T.Failure:
                    T.fail(f"a client that sent {what} is still connected after "
                           f"{time.monotonic() - t0:.0f} s (design §2.4: the handshake has "
                           f"{HANDSHAKE_LIMIT} s)")
        finally:
            for c in clients.values():
                c.close()


def case_no_tls(S, pki, tmp):
    """Without --tls-creds: STARTTLS gets ERR_POLICY, TLS_REQD is never sent, a client that
    requires TLS fails."""
    with S.under_test(new_image(tmp, 16 * MiB)) as srv:
        with H.Client(srv.sock) as c:
            c.start()
            c.expect_option_error(H.OPT_STARTTLS, b"", H.ERR_POLICY, "STARTTLS without TLS")
            c.expect_option_error(0x4242, b"junk", H.ERR_UNSUP, "unknown option without TLS")
            T.check_eq(c.go()[0], H.REP_ACK, "GO after the refused STARTTLS")
            T.check_eq(c.read(0, 4096), bytes(4096), "READ without TLS")
            c.disconnect()
        expect_refused(T.run(["nbdinfo", NS.nbds_uri(srv.sock, pki.cli)], timeout=TIMEOUT),
                       "nbdinfo requiring TLS from a server without it")
        tool("nbdinfo", srv.uri, what="plain nbdinfo")


# --------------------------------------------------------------------------------------
# Cases: bad credentials
# --------------------------------------------------------------------------------------

def bad_creds(pki):
    """[(name, ours_only, server options, stderr keywords)]: each must fail at start."""
    missing = os.path.join(pki.root, "no-such-dir")
    return [
        ("missing-dir", False, object_args(missing), ["ca-cert.pem", missing]),
        ("missing-server-key", False, object_args(pki.nokey), ["server-key.pem"]),
        ("junk-ca-cert", False, object_args(pki.junkca), ["ca-cert.pem", "CA"]),
        ("junk-crl", False, object_args(pki.junkcrl), ["crl"]),
        ("endpoint-client", False, object_args(pki.srv, endpoint="client"), ["endpoint"]),
        ("unknown-id", False, object_args(pki.srv, creds_id="tls1"), ["tls1"]),
        ("bad-verify-peer", False, object_args(pki.srv, verify_peer="maybe"),
         ["verify-peer"]),
        ("dir-form-missing-dir", True, ["--tls-creds", missing], [missing]),
        ("dir-form-missing-server-key", True, ["--tls-creds", pki.nokey], ["server-key.pem"]),
        ("dir-form-junk-ca-cert", True, ["--tls-creds", pki.junkca], ["ca-cert.pem", "CA"]),
    ]


def case_bad_creds(S, tmp, opts, keywords):
    img = new_image(tmp, 16 * MiB, name="badcreds")
    sock = os.path.join(os.path.dirname(img), "s")
    argv = NS.server_argv(S.kind, S.qcow2kit, sock, img, opts)
    res = T.run(argv, timeout=10)
    if res.timed_out:
        T.fail(f"{S.name} did not fail at start: still running after 10 s "
               f"(listening: {os.path.exists(sock)}):\n{res.describe()}")
    T.expect_clean_error(res, keywords, f"{S.name} with bad TLS credentials")
    T.check(not os.path.exists(sock), f"socket {sock} left behind")
    NS.check_image_clean(img)


# --------------------------------------------------------------------------------------

def main():
    args = NS.parse_args(__doc__)
    R = T.Runner(args, "test_nbd_tls")
    S = NS.Servers(args, R.tmp)
    if not S.check_binary(R):
        R.finish()
    missing = [t for t in TOOLS if not shutil.which(t)]
    if missing:
        with R.case("tools-installed"):
            T.fail(f"missing tools: {missing}")
        R.finish()
    pki = R.setup("certificates", Pki, os.path.join(R.tmp, "pki"))
    if pki is None:
        R.finish()
    tmp = R.tmp

    def ours_only(name, fn, *a):
        if S.peer:
            print(f"# {name}: ours only, no peer comparison (qemu-nbd has no --tls-creds DIR form)")
        else:
            R.defer(name, fn, *a)

    R.defer("tls/handshake-stall-time-limit", case_handshake_stall, S, pki, tmp)  # slow: first
    R.defer("tls/nbdinfo", case_nbdinfo, S, pki, tmp)
    R.defer("tls/qemu-io-script-and-compare", case_qemu_io, S, pki, tmp)
    R.defer("tls/qemu-img-map", case_qemu_img_map, S, pki, tmp)
    R.defer("tls/nbdcopy-out-C4", case_nbdcopy_out, S, pki, tmp)
    R.defer("tls/nbdcopy-in-C4-flush", case_nbdcopy_in, S, pki, tmp)
    R.defer("tls/tcp-listener", case_tcp, S, pki, tmp)
    R.defer("tls/refused-clients", case_refused, S, pki, tmp)
    R.defer("tls/ca-crl", case_crl, S, pki, tmp)
    R.defer("tls/object-form", case_object_form, S, pki, tmp, None)
    R.defer("tls/object-form-verify-peer-on", case_object_form, S, pki, tmp, "on")
    R.defer("tls/object-form-verify-peer-off", case_object_form, S, pki, tmp, "off")
    R.defer("notls/starttls-policy", case_no_tls, S, pki, tmp)
    for name, ours, opts, keywords in bad_creds(pki):
        if ours:
            ours_only(f"tls/bad-creds/{name}", case_bad_creds, S, tmp, opts, keywords)
        else:
            R.defer(f"tls/bad-creds/{name}", case_bad_creds, S, tmp, opts, keywords)
    R.run_deferred()

    # One server, the raw cases one after another on it.
    case_raw(S, pki, tmp, R)
    with R.case("tls/fio-randwrite-qd32-verify"):
        case_fio(S, pki, tmp)
    R.finish()


if __name__ == "__main__":
    main()
