"""DICOM TLS: the SCP with a certificate (mutual TLS with a CA), the SCU verifying the peer."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest
from node_helpers import echoscu
from pynetdicom.sop_class import RTStructureSetStorage  # type: ignore[attr-defined]
from test_scp import InProcessScp, _dataset

from dicom_node.scu import SendError, echo, store_file
from rtseg.settings import TlsSettings


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private CA, a node certificate (SAN 127.0.0.1) and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "2", "-subj", "/CN=rtseg test CA", cwd=d)  # fmt: skip
    for name in ("node", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)  # fmt: skip
        (d / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=d)  # fmt: skip
    return d


def _rtstruct(path: Path) -> Path:
    ds = _dataset(RTStructureSetStorage, "1.2.3.4.30", "1.2.3.31")
    ds.Modality = "RTSTRUCT"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_tls_scp_accepts_verified_clients_only(pki: Path, tmp_path: Path) -> None:
    node = InProcessScp(
        tmp_path / "data",
        {
            "RTSEG_DICOM_TLS_CERT": str(pki / "node.crt"),
            "RTSEG_DICOM_TLS_KEY": str(pki / "node.key"),
            "RTSEG_DICOM_TLS_CA": str(pki / "ca.crt"),
        },
    )
    try:
        dest = {"ae_title": "RTSEG", "host": "127.0.0.1", "port": node.port, "tls": True}
        client = TlsSettings(pki / "client.crt", pki / "client.key", pki / "ca.crt")
        ok, _ = echo("MODALITY", dest, client)
        assert ok
        assert echoscu(node.port) != 0  # plain DICOM on the TLS port
        no_cert = TlsSettings(None, None, pki / "ca.crt")
        assert echo("MODALITY", dest, no_cert)[0] is False  # mutual TLS: a client certificate is required
        rtstruct = _rtstruct(tmp_path / "rs.dcm")
        with pytest.raises(SendError):  # a node we cannot verify (no CA given: system trust store)
            store_file("MODALITY", dest, rtstruct, TlsSettings())
        # the SCU side of TLS: a C-STORE over TLS lands in the spool
        store_file("MODALITY", dest, rtstruct, client)
        (stored,) = node.spooled()
        assert pydicom.dcmread(stored).Modality == "RTSTRUCT"
    finally:
        node.close()
