"""PEFT's own common tuner tests (``tests/test_custom_models.py`` of the installed PEFT), run on SaRA.

PEFT checks every tuner with one shared suite: ``TestPeftCustomModel`` and friends, parametrized over the module-level
lists ``TEST_CASES`` (model id + config), ``MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES`` and ``ALL_PEFT_CONFIG_CLASSES``.
The suite is not part of PEFT's wheel, only of its sdist: ``tests/peft_suite/fetch_peft_tests.sh`` downloads the sdist
of the installed version and extracts its ``tests/`` folder to ``.cache/peft-tests/peft-<version>/tests``. Without that
folder this module is skipped (set ``PEFT_TESTS_DIR`` to use another copy).

How the suite is reused: for each upstream test class we create a subclass whose test methods are copies of the
upstream ones with their parametrization swapped: wherever a method is parametrized over one of the generic lists
above, it gets the SaRA list instead (``SARA_TEST_CASES``, ``SARA_MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES``,
``[SaRAConfig]``). Every other upstream test is hidden (set to ``None``, which pytest does not collect): those are
written for one specific method (LoRA, IA³, DoRA, trainable tokens, ...) and hard-code its config. The test bodies run
unchanged, so a new PEFT release checks SaRA against its new expectations automatically.

Known deviations of SaRA are listed in ``EXPECTATIONS``: strict xfails for real SaRA bugs or deliberate design
differences (they turn into failures once fixed, so the entry must then be removed) and skips for tests that cannot
apply to SaRA, each with its reason.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from peft_sara import SaRAConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
PEFT_VERSION = importlib.metadata.version("peft")
PEFT_TESTS_DIR = Path(
    os.environ.get("PEFT_TESTS_DIR") or REPO_ROOT / ".cache" / "peft-tests" / f"peft-{PEFT_VERSION}" / "tests"
)

if not (PEFT_TESTS_DIR / "test_custom_models.py").is_file():
    pytest.skip(
        f"PEFT's test suite for peft=={PEFT_VERSION} is not at {PEFT_TESTS_DIR}: run "
        "`bash tests/peft_suite/fetch_peft_tests.sh` first (CI does).",
        allow_module_level=True,
    )

# PEFT's tests import each other relatively (`from .testing_common import ...`), so load them as a package. The name
# must not clash with this repository's own `tests` folder.
UPSTREAM_PACKAGE = "peft_upstream_tests"


def _import_upstream(module: str) -> types.ModuleType:
    if UPSTREAM_PACKAGE not in sys.modules:
        # Informative assertion messages in the upstream test bodies, as when pytest collects them itself.
        pytest.register_assert_rewrite(f"{UPSTREAM_PACKAGE}.test_custom_models", f"{UPSTREAM_PACKAGE}.testing_common")
        package = types.ModuleType(UPSTREAM_PACKAGE)
        package.__path__ = [str(PEFT_TESTS_DIR)]
        package.__file__ = str(PEFT_TESTS_DIR / "__init__.py")
        sys.modules[UPSTREAM_PACKAGE] = package
    return importlib.import_module(f"{UPSTREAM_PACKAGE}.{module}")


upstream = _import_upstream("test_custom_models")

# Noise from the upstream bodies, the same for every PEFT method: the mock model ids ("MLP", "Conv2d", ...) are passed
# as `base_model_name_or_path` and looked up on the Hub, and FSDP on one CPU process falls back to NO_SHARD.
pytestmark = [
    pytest.mark.filterwarnings("ignore:The PEFT config's `base_model_name_or_path` was renamed:UserWarning"),
    pytest.mark.filterwarnings("ignore:Unable to fetch remote file:UserWarning"),
    pytest.mark.filterwarnings("ignore:Could not find a config file:UserWarning"),
    pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`:UserWarning"),
    pytest.mark.filterwarnings("ignore:When using ``NO_SHARD``:UserWarning"),
]

# ---------------------------------------------------------------------------------------------------- SaRA cases
# Selection with random tiny models: default-initialised weights are uniform in +-1/sqrt(fan_in), so the paper's
# 2e-3 threshold would select almost nothing. The thresholds below select 5-50% of each targeted weight (seed 0,
# counted for MockTransformerWrapper's models); layers too small for a threshold (Conv1d's 2 weights, Conv2d1x1's
# 10) use `trainable_fraction`, which always selects at least one entry.
# The Triton kernel runs on CUDA, or on CPU through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1
# when there is no GPU); without Triton installed `kernel="triton"` raises by design.
requires_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="Triton is not installed (the `test` extra installs it on Linux)"
)

SARA_TEST_CASES = [
    ("Vanilla MLP 1 SaRA", "MLP", SaRAConfig, {"target_modules": "lin0", "threshold": 0.05}),
    ("Vanilla MLP 2 SaRA", "MLP", SaRAConfig, {"target_modules": ["lin0"], "trainable_fraction": 0.1}),
    ("Vanilla MLP 3 SaRA", "MLP", SaRAConfig, {"target_modules": ["lin1"], "threshold": 0.05}),
    ("Vanilla MLP 4 SaRA", "MLP", SaRAConfig, {"target_modules": ["lin0", "lin1"], "trainable_fraction": 0.2}),
    (
        "Vanilla MLP 5 SaRA",
        "MLP",
        SaRAConfig,
        {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "threshold": 0.05},
    ),
    (
        "Vanilla MLP 6 SaRA",
        "MLP",
        SaRAConfig,
        {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "trainable_fraction": 0.5},
    ),
    (
        "Vanilla MLP 7 SaRA",
        "MLP",
        SaRAConfig,
        {"target_modules": r"lin\d", "exclude_modules": ["lin1"], "trainable_fraction": 0.2},
    ),
    pytest.param(
        "Vanilla MLP 8 SaRA triton",
        "MLP",
        SaRAConfig,
        {"target_modules": ["lin0", "lin1"], "trainable_fraction": 0.2, "kernel": "triton"},
        marks=requires_triton,
    ),
    (
        "Embedding + transformers Conv1D 1 SaRA",
        "EmbConv1D",
        SaRAConfig,
        {"target_modules": ["conv1d"], "trainable_fraction": 0.4},
    ),
    ("Conv1d 1 SaRA", "Conv1d", SaRAConfig, {"target_modules": ["conv1d"], "trainable_fraction": 0.5}),
    ("Conv1d 2 SaRA", "Conv1d", SaRAConfig, {"target_modules": ["conv1d", "lin0"], "trainable_fraction": 0.5}),
    ("Conv1d Groups SaRA", "Conv1dGroups", SaRAConfig, {"target_modules": ["conv1d"], "trainable_fraction": 0.2}),
    ("Conv2d 1 SaRA", "Conv2d", SaRAConfig, {"target_modules": ["conv2d"], "threshold": 0.05}),
    # lin0 of "Conv2d" sees 10 ReLU features of which 6 are dead for the test input: a small fraction may select
    # only entries in dead columns, which then never get a gradient (test_only_params_are_updated would fail).
    ("Conv2d 2 SaRA", "Conv2d", SaRAConfig, {"target_modules": ["conv2d", "lin0"], "trainable_fraction": 0.5}),
    pytest.param(
        "Conv2d 3 SaRA triton",
        "Conv2d",
        SaRAConfig,
        {"target_modules": ["conv2d", "lin0"], "trainable_fraction": 0.5, "kernel": "triton"},
        marks=requires_triton,
    ),
    ("Conv2d 1x1 SaRA", "Conv2d1x1", SaRAConfig, {"target_modules": ["conv2d"], "trainable_fraction": 0.3}),
    ("Conv2d Groups SaRA", "Conv2dGroups", SaRAConfig, {"target_modules": ["conv2d"], "threshold": 0.05}),
    (
        "Conv2d Groups 2 SaRA",
        "Conv2dGroups",
        SaRAConfig,
        {"target_modules": ["conv2d", "lin0"], "trainable_fraction": 0.05},
    ),
    # padding=1, groups=2
    ("Conv2d Groups2 SaRA", "Conv2dGroups2", SaRAConfig, {"target_modules": ["conv2d"], "threshold": 0.05}),
    ("Conv3d 1 SaRA", "Conv3d", SaRAConfig, {"target_modules": ["conv3d"], "threshold": 0.02}),
    ("Conv3d 2 SaRA", "Conv3d", SaRAConfig, {"target_modules": ["conv3d", "lin0"], "trainable_fraction": 0.1}),
]

# Model: upstream `MLP` (lin0: 10 -> 20, lin1: 20 -> 2). "Same" adapters overlap on lin0 (their trainable entries
# coincide); "Different" ones adapt disjoint layers.
SARA_MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES = [
    (
        "SaRA Same",
        "sara",
        SaRAConfig,
        {"target_modules": ["lin0"], "threshold": 0.05, "init_weights": False},
        {"target_modules": ["lin0"], "threshold": 0.05, "init_weights": False},
    ),
    (
        "SaRA Same fraction",
        "sara",
        SaRAConfig,
        {"target_modules": ["lin0"], "trainable_fraction": 0.1, "init_weights": False},
        {"target_modules": ["lin0"], "trainable_fraction": 0.3, "init_weights": False},
    ),
    (
        "SaRA Different",
        "sara",
        SaRAConfig,
        {"target_modules": ["lin0"], "threshold": 0.05, "init_weights": False},
        {"target_modules": ["lin1"], "trainable_fraction": 0.5, "init_weights": False},
    ),
]

# Generic upstream case lists -> their SaRA replacement. Matched by identity with the parametrize mark's argvalues.
GENERIC_CASES = [
    (upstream.TEST_CASES, SARA_TEST_CASES),
    (upstream.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES, SARA_MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES),
    (upstream.ALL_PEFT_CONFIG_CLASSES, [SaRAConfig]),
]

# Generic tests whose parametrization is an ad-hoc list of methods rather than one of the lists above.
EXTRA_PARAMETRIZATIONS: dict[tuple[str, str], list[Any]] = {
    ("test_multiple_adapters_mixed_modules_to_save", "config_cls"): [SaRAConfig],
    ("test_multiple_adapters_mixed_modules_to_save_order_switched", "config_cls"): [SaRAConfig],
    ("test_adapter_name_makes_no_difference", "config0"): [
        SaRAConfig(target_modules=["lin0"], threshold=0.05, init_weights=False)
    ],
}


# ---------------------------------------------------------------------------------------------------- expectations
# Skips that upstream itself makes for SaRA, with upstream's reasons (all inapplicable to SaRA, none hides a bug):
# - "<SaRAConfig> does not support the 'bias' argument" (test_adding_multiple_adapters_with_bias_raises) and "This
#   test requires the PEFT method to support training the bias directly" (test_save_load_roundtrip_fsdp_wrapped_
#   learnable_bias): SaRA has no `bias=` option; it adapts weights only (a bias can be trained via modules_to_save).
# - "Testing bias warnings only for LoraConfig or BOFTConfig" (test_disable_adapter_with_bias_warns).
# - "Multiple active adapters with modules_to_save/trainable_token_indices is not supported"
#   (test_active_adapter on the modules_to_save cases): a limitation of PEFT's ModulesToSaveWrapper, for every method.
@dataclass(frozen=True)
class Expectation:
    """An upstream test that cannot pass on SaRA: ``xfail`` (strict) or ``skip``, where ``when(params)`` holds."""

    action: str  # "xfail" or "skip"
    test: str  # upstream test method name
    reason: str
    when: Callable[[dict[str, Any]], bool] = lambda params: True
    raises: type[BaseException] = AssertionError  # xfail only: the failure expected


# Empty: every reused upstream test passes on SaRA. Add entries here (never edit the upstream files), e.g.
#     Expectation("xfail", "test_adapter_dtype_autocast", "SaRA keeps float32 values with autocast_adapter_dtype=False",
#                 lambda params: not params["autocast_adapter_dtype"] and params["dtype"] != torch.float32),
# which was needed while SaRALayer created `sara_values` in float32 whatever the base dtype (PEFT's contract: with
# `autocast_adapter_dtype=False` adapter parameters keep the base dtype). A strict xfail fails as XPASS once the bug
# is fixed, so remove the entry then.
EXPECTATIONS: list[Expectation] = []


def _apply_expectations(request: pytest.FixtureRequest) -> None:
    params = request.node.callspec.params if hasattr(request.node, "callspec") else {}
    for expectation in EXPECTATIONS:
        if expectation.test == request.node.originalname and expectation.when(params):
            if expectation.action == "skip":
                pytest.skip(expectation.reason)
            # Added before the test body runs, so pytest evaluates it at call time; strict=True reports XPASS as a
            # failure once SaRA is fixed.
            marker = pytest.mark.xfail(strict=True, raises=expectation.raises, reason=expectation.reason)
            request.applymarker(marker)


# ---------------------------------------------------------------------------------------------------- re-parametrize
def _sara_argvalues(test: str, mark: pytest.Mark) -> list[Any] | None:
    argnames, argvalues = mark.args[0], mark.args[1]
    for generic, sara in GENERIC_CASES:
        if argvalues is generic:
            return sara
    return EXTRA_PARAMETRIZATIONS.get((test, argnames))


def _sara_test(name: str, func: Callable) -> Callable | None:
    """A copy of the upstream test ``func`` parametrized with SaRA cases, or None if it has no generic parametrization."""
    marks, replaced = [], False
    for mark in getattr(func, "pytestmark", []):
        argvalues = _sara_argvalues(name, mark) if mark.name == "parametrize" else None
        if argvalues is not None:
            kwargs = {key: value for key, value in mark.kwargs.items() if key != "ids"}
            mark = pytest.mark.parametrize(mark.args[0], argvalues, **kwargs).mark
            replaced = True
        marks.append(mark)
    if not replaced:
        return None
    copy = types.FunctionType(func.__code__, func.__globals__, name, func.__defaults__, func.__closure__)
    copy.__kwdefaults__ = func.__kwdefaults__
    copy.__dict__.update(func.__dict__)
    copy.__doc__, copy.__qualname__ = func.__doc__, func.__qualname__
    copy.pytestmark = marks
    return copy


def _sara_class(upstream_cls: type, name: str) -> type:
    """Subclass of an upstream test class that runs only its generic tests, on SaRA cases."""
    namespace: dict[str, Any] = {"__module__": __name__, "__doc__": f"PEFT's {upstream_cls.__name__} on SaRA."}
    for attr in dir(upstream_cls):
        if attr.startswith("test_"):
            # None hides method-specific upstream tests from collection.
            namespace[attr] = _sara_test(attr, getattr(upstream_cls, attr))

    @pytest.fixture(autouse=True)
    def _sara_expectations(self, request):
        _apply_expectations(request)

    namespace["_sara_expectations"] = _sara_expectations
    return type(name, (upstream_cls,), namespace)


# Not reused: TestMixedAdapterBatches (SaRA rejects `adapter_names=` mixed batches by design, with a ValueError
# naming the alternative), TestDynamicDispatch, TestMultiRankAdapter and TestLayerRepr (LoRA-only features), and
# TestDefaultTargetModules (checks methods registered in PEFT's own default-target mapping).
TestSaRAPeftCustomModel = _sara_class(upstream.TestPeftCustomModel, "TestSaRAPeftCustomModel")
TestSaRAMultipleActiveAdapters = _sara_class(upstream.TestMultipleActiveAdapters, "TestSaRAMultipleActiveAdapters")
TestSaRARequiresGrad = _sara_class(upstream.TestRequiresGrad, "TestSaRARequiresGrad")
TestSaRAPeftFsdpStateDict = _sara_class(upstream.TestPeftFsdpStateDict, "TestSaRAPeftFsdpStateDict")


SARA_CLASSES = [
    TestSaRAPeftCustomModel,
    TestSaRAMultipleActiveAdapters,
    TestSaRARequiresGrad,
    TestSaRAPeftFsdpStateDict,
]


def test_upstream_suite_is_reused():
    """Guard against a PEFT release renaming its case lists: every class must still run upstream tests on SaRA."""
    for cls in SARA_CLASSES:
        reused = [name for name in dir(cls) if name.startswith("test_") and callable(getattr(cls, name))]
        assert reused, f"{cls.__name__} reuses no upstream test: did PEFT rename TEST_CASES & co.?"
    assert (
        len(
            [
                name
                for name in dir(TestSaRAPeftCustomModel)
                if callable(getattr(TestSaRAPeftCustomModel, name)) and name.startswith("test_")
            ]
        )
        >= 30
    )
    expected_tests = {expectation.test for expectation in EXPECTATIONS}
    reused = {name for cls in SARA_CLASSES for name in dir(cls) if callable(getattr(cls, name, None))}
    assert expected_tests <= reused, f"EXPECTATIONS name tests that no longer exist: {expected_tests - reused}"
