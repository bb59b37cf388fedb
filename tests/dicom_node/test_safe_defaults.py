"""Issue 19 point 6: the node's defaults are the README's (loopback DICOM; scouts, bolus tracking skipped)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from dicom_node.assembly import SeriesHeader, select
from rtseg.settings import load_settings

CT = SeriesHeader("CT", "Abdomen 2.0 B30f", "ABDOMEN", ("ORIGINAL", "PRIMARY", "AXIAL"), 2.0)


@pytest.mark.parametrize(
    "description",
    ["Topogram 0.6 T20s", "SCOUT", "Surview", "Scanogram", "CARE Bolus", "Bolus tracking", "Monitoring"],
)
def test_default_selection_skips_scouts_and_bolus_tracking(description: str) -> None:
    selection = load_settings(environ={}).selection
    reason = select(selection, replace(CT, description=description), 100)
    assert reason == "series description matches the exclude pattern ([selection] series_description_exclude)"


def test_default_selection_keeps_a_diagnostic_series_and_skips_localizer_image_type() -> None:
    selection = load_settings(environ={}).selection
    assert select(selection, CT, 100) is None
    localizer = replace(CT, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    assert (
        select(selection, localizer, 100)
        == "image type LOCALIZER is excluded ([selection] image_type_exclude)"
    )


def test_an_empty_exclude_pattern_turns_the_default_off(tmp_path: object) -> None:
    selection = load_settings(environ={"RTSEG_SELECTION_SERIES_DESCRIPTION_EXCLUDE": ""}).selection
    assert select(selection, replace(CT, description="Topogram"), 100) is None


def test_dicom_listens_on_loopback_unless_told() -> None:
    assert load_settings(environ={}).dicom.host == "127.0.0.1"
    opted_in = load_settings(environ={"RTSEG_DICOM_HOST": "0.0.0.0"})
    assert opted_in.dicom.host == "0.0.0.0"
