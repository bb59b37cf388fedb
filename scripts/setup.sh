#!/usr/bin/env bash
# Set up rtseg on a fresh Debian 12 / Python 3.11 machine and run one job.
#   scripts/setup.sh run    set up, then run the main job
#   scripts/setup.sh test   set up (with the DICOM test peers), then run the fast tests
#                           (scripts/setup.sh test -m slow: the long scenarios)
# Extra arguments after the job name go to the job (e.g. pytest options).
set -euo pipefail
cd "$(dirname "$0")/.."
job="${1:-run}"; shift || true
VENV="${RTSEG_VENV:-.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

install_test_peers() {
    # Real DICOM peers the tests talk to: dcmtk, Orthanc (with its DICOMweb plugin), dicom3tools,
    # plastimatch; and a real browser for the web console's pages (headless Chromium).
    local missing=()
    command -v storescu >/dev/null || missing+=(dcmtk)
    command -v Orthanc >/dev/null || missing+=(orthanc)
    [ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing+=(orthanc-dicomweb)  # STOW-RS client
    command -v dciodvfy >/dev/null || missing+=(dicom3tools)
    command -v plastimatch >/dev/null || missing+=(plastimatch)
    command -v chromium >/dev/null || missing+=(chromium)
    if [ ${#missing[@]} -gt 0 ]; then
        echo "installing Debian packages: ${missing[*]}"
        as_root apt-get update -qq
        DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

install_python() {
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    local pip=("$VENV/bin/pip" install -q --disable-pip-version-check)
    if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
        # torch and torchvision in ONE command: otherwise nnunetv2 → timm → torchvision
        # upgrades torch to a CUDA build. On a CPU machine pip takes the CPU wheel.
        "${pip[@]}" torch==2.13.0 torchvision==0.28.0
    fi
    "${pip[@]}" -e ".[${1:-test}]"
}

case "$job" in
    run)
        install_python "test,openvino"  # openvino: the network engine measured fastest on a CPU ([node] engine = "auto")
        exec "$VENV/bin/rtseg" serve "$@"
        ;;
    test)
        install_test_peers
        install_python "test,levers"  # levers: the other network runtimes the bench's tests cover
        # the fast suite by default; "-m slow" (a later -m wins) runs the long scenarios
        exec "$VENV/bin/python" -m pytest -m "not slow" "$@"
        ;;
    *)
        echo "usage: scripts/setup.sh run|test [args...]" >&2
        exit 2
        ;;
esac
