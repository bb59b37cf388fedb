"""Plans that cannot run code: every name nnU-Net resolves must be one its own presets use.

nnU-Net builds a network from ``plans.json`` with ``pydoc.locate`` on the
network class and on the keyword arguments listed in ``_kw_requires_import``
(``conv_op``, ``norm_op``, ``dropout_op``, ``nonlin``), then calls them; it
finds the preprocessor, resampling functions, normalisation schemes, image
reader, label manager and planner by name in its own package; and it joins
the dataset, plans, data identifier and configuration names into folder paths.
A plans file is data from elsewhere (a model folder, a federation coordinator),
so a crafted one could name ``subprocess.Popen`` as the nonlinearity with a
shell command in its keyword arguments, or write outside nnU-Net's folders.

:func:`check_plans` accepts only the names nnU-Net 2.8's planners write (and
the torch layers its trainer variants swap in), plain JSON values everywhere
else, and plain folder names where a name becomes a path. Anything else is a
:class:`~rtseg.errors.ModelError` naming the file and the field.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from rtseg.errors import ModelError
from rtseg.paths import SAFE_NAME

_DNA = "dynamic_network_architectures.architectures"
NETWORK_CLASSES = frozenset(
    {
        f"{_DNA}.unet.PlainConvUNet",  # ExperimentPlanner
        f"{_DNA}.unet.ResidualEncoderUNet",  # ResEnc planners
        f"{_DNA}.residual_unet.ResidualEncoderUNet",  # nnU-Net's conversion of old plans
    }
)


def _torch_names(module: str, names: tuple[str, ...]) -> frozenset[str]:
    """``torch.nn.modules.<module>.X`` as nnU-Net's planners write it, and the short ``torch.nn.X``."""
    return frozenset(f"torch.nn.modules.{module}.{n}" for n in names) | {f"torch.nn.{n}" for n in names}


_DIMS = ("1d", "2d", "3d")
# arch_kwargs nnU-Net (get_network_from_plans, nnUNetTrainerBN) imports by dotted name, then calls
IMPORTED_KWARGS: dict[str, frozenset[str]] = {
    "conv_op": _torch_names("conv", tuple(f"Conv{d}" for d in _DIMS)),
    "norm_op": _torch_names("instancenorm", tuple(f"InstanceNorm{d}" for d in _DIMS))
    | _torch_names("batchnorm", tuple(f"BatchNorm{d}" for d in _DIMS)),
    "dropout_op": _torch_names("dropout", ("Dropout", *(f"Dropout{d}" for d in _DIMS))),
    "nonlin": _torch_names("activation", ("LeakyReLU", "ReLU", "PReLU", "ELU", "GELU")),
}
_RESAMPLING = frozenset(
    {
        "resample_data_or_seg_to_shape",
        "resample_data_or_seg_to_spacing",
        "resample_torch_fornnunet",
        "no_resampling_hack",
    }
)
# configuration fields nnU-Net finds by name in its own package (recursive_find_python_class)
CONFIGURATION_NAMES: dict[str, frozenset[str]] = {
    "preprocessor_name": frozenset({"DefaultPreprocessor"}),
    "resampling_fn_data": _RESAMPLING,
    "resampling_fn_seg": _RESAMPLING,
    "resampling_fn_probabilities": _RESAMPLING,
}
NORMALIZATION_SCHEMES = frozenset(
    {
        "CTNormalization",
        "NoNormalization",
        "ZScoreNormalization",
        "RescaleTo01Normalization",
        "RGBTo01Normalization",
    }
)
# top-level fields nnU-Net finds by name in its own package
PLANS_NAMES: dict[str, frozenset[str]] = {
    "image_reader_writer": frozenset(
        {"SimpleITKIO", "NibabelIO", "NibabelIOWithReorient", "NaturalImage2DIO", "Tiff3DIO"}
    ),
    "label_manager": frozenset({"LabelManager"}),
    "experiment_planner_used": frozenset(
        {
            "ExperimentPlanner",
            "ResEncUNetPlanner",
            "nnUNetPlannerResEncM",
            "nnUNetPlannerResEncL",
            "nnUNetPlannerResEncXL",
            "nnUNetPlanner_torchres",
            "nnUNetPlannerResEncL_torchres",
            "nnUNetPlannerResEncL_torchres_sepz",
            "nnUNetPlannerResEncL_noResampling",
        }
    ),
}
PATH_NAMES = ("dataset_name", "plans_name")  # top-level names nnU-Net joins into folder paths
CONFIGURATION_PATH_NAMES = ("data_identifier", "inherits_from", "previous_stage", "next_stage")
# nnU-Net's plans nest 7 levels (plans.configurations.3d_fullres.architecture.arch_kwargs.kernel_sizes[i][j]);
# a few hundred levels would overflow Python's stack in this check (plans also come from a coordinator)
MAX_DEPTH = 32
# a checkpoint's trainer class is looked up by name in nnU-Net's trainer package; a dotted or
# otherwise odd name is no trainer class
TRAINER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


def check_plans(plans: Any, source: str) -> None:
    """Raise :class:`ModelError` unless ``plans`` is plain data naming only nnU-Net's own classes.

    Parameters
    ----------
    plans
        The parsed ``plans.json`` (or plans received from a coordinator).
    source
        What to name in the message: the file, or where the plans came from.
    """
    _check_plain(plans, "plans", source)
    if not isinstance(plans, dict):
        raise ModelError("plans are not a JSON object", source=source)
    for key, allowed in PLANS_NAMES.items():
        if key in plans:
            _check_choice(plans[key], key, allowed, source)
    for key in PATH_NAMES:
        if key in plans:
            _check_path_name(plans[key], key, source)
    configurations = plans.get("configurations")
    if not isinstance(configurations, dict):
        raise ModelError("plans have no 'configurations' object", source=source)
    for name, configuration in configurations.items():
        _check_path_name(name, "configurations", source)
        if not isinstance(configuration, dict):
            raise ModelError(f"configuration {name!r} is not an object", source=source)
        _check_configuration(configuration, f"configurations.{name}", source)


def check_trainer_name(name: Any, source: str) -> None:
    """Raise :class:`ModelError` unless ``name`` can only be a class name nnU-Net looks up."""
    if not isinstance(name, str) or not TRAINER_NAME.fullmatch(name):
        raise ModelError(
            f"trainer_name {_show(name)} is not a class name; nnU-Net would look it up and run it",
            source=source,
        )


def _check_configuration(configuration: dict[str, Any], where: str, source: str) -> None:
    for key, allowed in CONFIGURATION_NAMES.items():
        if key in configuration:
            _check_choice(configuration[key], f"{where}.{key}", allowed, source)
    schemes = configuration.get("normalization_schemes", [])
    if not isinstance(schemes, list):
        raise ModelError(f"{where}.normalization_schemes is not a list", source=source)
    for i, scheme in enumerate(schemes):
        _check_choice(scheme, f"{where}.normalization_schemes[{i}]", NORMALIZATION_SCHEMES, source)
    for key in CONFIGURATION_PATH_NAMES:
        values = configuration.get(key)
        for value in values if isinstance(values, list) else [values]:
            if value is not None:
                _check_path_name(value, f"{where}.{key}", source)
    if "architecture" in configuration:
        _check_architecture(configuration["architecture"], f"{where}.architecture", source)


def _check_architecture(architecture: Any, where: str, source: str) -> None:
    if not isinstance(architecture, dict):
        raise ModelError(f"{where} is not an object", source=source)
    _check_choice(
        architecture.get("network_class_name"), f"{where}.network_class_name", NETWORK_CLASSES, source
    )
    kwargs = architecture.get("arch_kwargs", {})
    if not isinstance(kwargs, dict):
        raise ModelError(f"{where}.arch_kwargs is not an object", source=source)
    imported = architecture.get("_kw_requires_import", [])
    if not isinstance(imported, list):
        raise ModelError(f"{where}._kw_requires_import is not a list", source=source)
    for key in imported:
        if key not in IMPORTED_KWARGS:
            raise ModelError(
                f"{where}._kw_requires_import lists {_show(key)}; nnU-Net would import that argument by"
                f" name, and rtseg allows that only for {', '.join(IMPORTED_KWARGS)}",
                source=source,
            )
    for key, allowed in IMPORTED_KWARGS.items():
        if kwargs.get(key) is not None:  # None: nnU-Net imports nothing (e.g. no dropout)
            _check_choice(kwargs[key], f"{where}.arch_kwargs.{key}", allowed, source)


def _check_choice(value: Any, where: str, allowed: frozenset[str], source: str) -> None:
    if value not in allowed:
        raise ModelError(
            f"{where} is {_show(value)}, which is not one of the classes or functions nnU-Net's own"
            " presets use; nnU-Net would import and run it, so rtseg refuses these plans",
            source=source,
        )


def _check_path_name(value: Any, where: str, source: str) -> None:
    if not isinstance(value, str) or not SAFE_NAME.fullmatch(value) or ".." in value:
        raise ModelError(
            f"{where} name {_show(value)} is not a plain folder name (1-64 letters, digits, '_', '.', '-');"
            " nnU-Net builds paths from it",
            source=source,
        )


def _check_plain(value: Any, where: str, source: str, depth: int = 0) -> None:
    """JSON values only, at most :data:`MAX_DEPTH` deep: nothing that could be called or carries behaviour."""
    if value is None or isinstance(value, bool | int | float | str):
        return
    if depth >= MAX_DEPTH:
        raise ModelError(f"{where} nests deeper than {MAX_DEPTH} levels: not nnU-Net plans", source=source)
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]", source, depth + 1)
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ModelError(f"{where} has a key {_show(key)} that is not a string", source=source)
            _check_plain(item, f"{where}.{key}", source, depth + 1)
        return
    raise ModelError(f"{where} is a {type(value).__name__}, not a plain JSON value", source=source)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
