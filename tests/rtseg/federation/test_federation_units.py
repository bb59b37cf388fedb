"""Fast checks of the federation's pieces (no Flower processes, no training)."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import numpy as np
import pytest

from rtseg.errors import FederationError
from rtseg.federation.aggregate import AggregationPolicy, Update, aggregate, screen, site_weights
from rtseg.federation.fingerprint import (
    N_BINS,
    FingerprintAccumulator,
    SiteFingerprint,
    check_labels,
    pooled_fingerprint,
)
from rtseg.federation.schedule import Window

LABELS = {"background": 0, "Liver": 1}


def _site(seed: int, n_cases: int, shift: int) -> tuple[SiteFingerprint, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    acc, values = FingerprintAccumulator(LABELS), []
    for _ in range(n_cases):
        image = rng.normal(40 + shift, 80, (9, 11, 13)).round().astype(np.int16)
        labels = (rng.random(image.shape) > 0.6).astype(np.uint8)
        acc.add(image, (3.0, 1.5, 1.5), labels)
        values.append(image[labels > 0].astype(np.float64))
    return acc.result(), values


def test_pooled_fingerprint_is_exact_and_carries_no_voxels() -> None:
    a, va = _site(1, 3, 0)
    b, vb = _site(2, 2, 150)  # a second center with shifted intensities
    record = a.to_record()
    assert set(record) == {"labels", "spacings", "shapes", "histogram", "count", "total", "total-sq"}
    assert len(record["histogram"]) == N_BINS and len(record["spacings"]) == 9
    pooled = pooled_fingerprint([SiteFingerprint.from_record(record), b])
    every = np.concatenate(va + vb)
    stats = pooled["foreground_intensity_properties_per_channel"]["0"]
    assert stats["mean"] == pytest.approx(every.mean(), rel=1e-9)
    assert stats["std"] == pytest.approx(every.std(), rel=1e-9)
    for key, q in (("percentile_00_5", 0.5), ("median", 50.0), ("percentile_99_5", 99.5)):
        assert stats[key] == pytest.approx(np.percentile(every, q), abs=1e-9)
    assert len(pooled["spacings"]) == 5 and pooled["shapes_after_crop"][0] == [9, 11, 13]


def test_sites_with_different_labels_are_refused_by_name() -> None:
    a, _ = _site(1, 1, 0)
    b = SiteFingerprint(
        {**a.__dict__, "labels": {"background": 0, "Spleen": 1}}["labels"], *list(a.__dict__.values())[1:]
    )
    with pytest.raises(FederationError, match="labels differ between sites: site-a .* site-b"):
        check_labels([("site-a", a), ("site-b", b)])


def _arrays(value: float) -> dict[str, np.ndarray]:
    return {"w": np.full((2, 3), value, np.float32), "b": np.full(3, value, np.float32)}


def test_screen_rejects_nan_wrong_keys_and_outliers_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    reference = _arrays(0.0)
    nan = _arrays(1.0)
    nan["w"][0, 0] = np.nan
    updates = [
        Update("a", _arrays(1.0), 10),
        Update("b", _arrays(1.2), 10),
        Update("c", _arrays(0.9), 10),
        Update("d", _arrays(100.0), 10),
        Update("e", nan, 10),
        Update("f", {"w": reference["w"]}, 10),
    ]
    with caplog.at_level(logging.WARNING, logger="rtseg.federation.aggregate"):
        fit, rejected = screen(updates, reference, AggregationPolicy())
    assert [u.site for u in fit] == ["a", "b", "c"]
    reasons = {r.site: r.reason for r in rejected}
    assert "NaN/Inf" in reasons["e"] and "keys differ" in reasons["f"] and "norm" in reasons["d"]
    assert "update of site e rejected: NaN/Inf" in caplog.text


def test_weighted_fedavg_caps_self_reported_counts_median_and_trimmed_mean() -> None:
    reference = _arrays(0.0)
    updates = [Update("a", _arrays(1.0), 3), Update("b", _arrays(4.0), 1_000_000)]
    weights = site_weights(updates, {"a": 3, "b": 1}, AggregationPolicy())
    assert weights == [3.0, 1.0]  # b declared 1 case in the fingerprint round
    avg = aggregate(updates, weights, reference, AggregationPolicy(max_share=1.0))
    assert np.allclose(avg["w"], (3 * 1.0 + 1 * 4.0) / 4) and avg["w"].dtype == np.float32
    bounded = aggregate(updates, weights, reference, AggregationPolicy())  # default max-share 0.5
    assert np.allclose(bounded["w"], (1.0 + 4.0) / 2)
    three = [*updates, Update("c", _arrays(2.0), 1)]
    assert np.allclose(aggregate(three, [1, 1, 1], reference, AggregationPolicy("median"))["b"], 2.0)
    trimmed = aggregate(three, [1, 1, 1], reference, AggregationPolicy("trimmed-mean", trim_fraction=0.34))
    assert np.allclose(trimmed["b"], 2.0)
    with pytest.raises(FederationError, match="unknown aggregation"):
        AggregationPolicy("krum")


def test_network_arrays_drop_aliases_and_reload() -> None:
    import torch
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    from rtseg.model.trainer import load_network_arrays, network_arrays

    def net() -> torch.nn.Module:
        return PlainConvUNet(
            1,
            3,
            (4, 8, 16),
            torch.nn.Conv3d,
            3,
            (1, 2, 2),
            2,
            3,
            2,
            True,
            torch.nn.InstanceNorm3d,
            {"affine": True},
            nonlin=torch.nn.LeakyReLU,
            deep_supervision=True,
        )

    torch.manual_seed(0)
    a, b = net(), net()
    arrays, aliases = network_arrays(a)
    # the decoder repeats the encoder; ConvDropoutNormReLU repeats conv/norm under all_modules
    assert any(k.startswith("decoder.encoder.") for k in aliases)
    assert any(".all_modules." in k for k in aliases)
    assert not any(k.startswith("decoder.encoder.") or "_orig_mod." in k for k in arrays)
    assert all(isinstance(v, np.ndarray) for v in arrays.values())
    load_network_arrays(b, arrays)
    for key, tensor in b.state_dict().items():
        assert torch.equal(tensor, a.state_dict()[key]), key


def test_certificates_name_loopback_and_site_keys_are_ecdsa(tmp_path: Path) -> None:
    from cryptography import x509

    from rtseg.federation.certs import make_certs

    certs = make_certs(tmp_path, ["site-a"], hosts=("coord.example",))
    cert = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "127.0.0.1" in [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    assert {"localhost", "coord.example"} <= set(san.get_values_for_type(x509.DNSName))
    assert certs.site_keys["site-a"][1].read_text().startswith("ecdsa-sha2-nistp384 ")
    assert certs.site_keys["site-a"][0].stat().st_mode & 0o077 == 0


def test_participation_window_wraps_midnight() -> None:
    nightly = Window.parse("22:00-06:00")
    assert nightly.contains(dt.time(23, 30)) and nightly.contains(dt.time(5, 59))
    assert not nightly.contains(dt.time(12, 0))
    assert Window.parse("always").contains(dt.time(12, 0))
    with pytest.raises(FederationError):
        Window.parse("nightly")
