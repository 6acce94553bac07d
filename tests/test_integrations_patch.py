"""The patch() machinery (fastrlhf/integrations/_patch.py) on in-memory stand-in packages."""

import subprocess
import sys
import types

import pytest

from fastrlhf.integrations import IntegrationWarning
from fastrlhf.integrations._patch import Target, apply_patch, check_params, replace_with


def original_fn(a, b=1):
    return ("original", a, b)


def other_fn(a, b=1):
    return ("other", a, b)


def ours(a, b=1, c=None):
    return ("ours", a, b)


@pytest.fixture
def tree():
    """pkg, pkg.core (defines fn, a registry), pkg.user (imports fn by name and under an alias)."""
    names = ["fake_pkg_patch", "fake_pkg_patch.core", "fake_pkg_patch.user", "fake_pkg_patch.broken"]
    root = types.ModuleType(names[0])
    root.__path__ = []
    root.__version__ = "1.2.3"
    core = types.ModuleType(names[1])
    core.fn = original_fn
    core.other = other_fn
    core.REGISTRY = {"vanilla": original_fn, "other": other_fn}
    user = types.ModuleType(names[2])
    user.fn = original_fn
    user._alias = original_fn
    outside = types.ModuleType("fake_pkg_patch_outside")  # another package: never touched
    outside.fn = original_fn
    mods = dict(zip(names[:3], (root, core, user)))
    mods["fake_pkg_patch_outside"] = outside
    sys.modules.update(mods)
    yield root, core, user, outside
    for name in list(mods) + [names[3]]:
        sys.modules.pop(name, None)


def _patch(root, targets):
    return apply_patch(root, targets, label="Fake", install_hint="pip install fake", caller="tests")


def test_replaces_every_reference_by_identity_and_undo_restores(tree):
    root, core, user, outside = tree
    h = _patch("fake_pkg_patch", [Target("core", "fn", replace_with(ours), check_params(["a", "b", "c"]))])
    assert h.active and h.package == "fake_pkg_patch" and h.version == "1.2.3"
    assert h.patched == ["fake_pkg_patch.core.fn"]
    assert sorted(h.sites) == sorted(["fake_pkg_patch.core.fn", "fake_pkg_patch.core.REGISTRY['vanilla']",
                                      "fake_pkg_patch.user.fn", "fake_pkg_patch.user._alias"])
    for f in (core.fn, user.fn, user._alias, core.REGISTRY["vanilla"]):
        assert f(5) == ("ours", 5, 1) and f.__fastrlhf_original__ is original_fn and f.__wrapped__ is ours
    assert core.other is other_fn and core.REGISTRY["other"] is other_fn and outside.fn is original_fn
    assert not hasattr(ours, "__fastrlhf_original__")  # the module-level function itself is never tagged
    h.undo()
    assert not h.active
    assert core.fn is user.fn is user._alias is core.REGISTRY["vanilla"] is original_fn
    h.undo()  # idempotent


def test_context_manager_and_module_object(tree):
    root, core, _, _ = tree
    with _patch(root, [Target("core", "fn", replace_with(ours))]) as h:
        assert core.fn(1)[0] == "ours"
    assert core.fn is original_fn and not h.active


def test_version_awareness_warns_and_skips(tree):
    root, core, user, _ = tree
    targets = [
        Target("core", "missing", replace_with(ours)),
        Target("core", "fn", replace_with(ours), check_params(["x", "b"])),  # other parameter names
        Target("nosuchmodule", "fn", replace_with(ours)),
        Target("core", "other", replace_with(ours), check_params(["a", "b", "c"])),
    ]
    with pytest.warns(IntegrationWarning) as rec:
        h = _patch("fake_pkg_patch", targets)
    with h:
        assert h.patched == ["fake_pkg_patch.core.other"]
        assert set(h.skipped) == {"fake_pkg_patch.core.missing", "fake_pkg_patch.core.fn",
                                  "fake_pkg_patch.nosuchmodule.fn"}
        assert "does not have it" in h.skipped["fake_pkg_patch.core.missing"]
        assert "['a', 'b']" in h.skipped["fake_pkg_patch.core.fn"]
        assert "import fake_pkg_patch.nosuchmodule" in h.skipped["fake_pkg_patch.nosuchmodule.fn"]
        assert len(rec) == 3 and all("Fake 1.2.3" in str(w.message) for w in rec)
        assert core.fn is original_fn and core.other(2)[0] == "ours"


def test_a_submodule_that_fails_to_import_is_skipped(tree):
    sys.modules["fake_pkg_patch.broken"] = None  # import of it raises ImportError
    with pytest.warns(IntegrationWarning, match="broken"):
        h = _patch("fake_pkg_patch", [Target("broken", "fn", replace_with(ours))])
    assert h.patched == [] and h.active
    h.undo()


def test_undo_leaves_sites_changed_since(tree):
    _, core, user, _ = tree
    h = _patch("fake_pkg_patch", [Target("core", "fn", replace_with(ours))])
    user.fn = other_fn  # someone else patched this site afterwards
    with pytest.warns(IntegrationWarning, match="changed after patch"):
        h.undo()
    assert user.fn is other_fn and core.fn is original_fn


def test_missing_package_raises_import_error():
    with pytest.raises(ImportError, match="pip install fake"):
        _patch("fake_pkg_that_is_not_installed_xyz", [])
    import fastrlhf.integrations.openrlhf as O
    import fastrlhf.integrations.trl as T
    import fastrlhf.integrations.verl as V

    for mod in (T, V, O):
        with pytest.raises(ImportError, match="module="):
            mod.patch(module="fake_pkg_that_is_not_installed_xyz")


def test_check_params():
    assert check_params(["a", "b", "c"])(original_fn) is None  # prefix
    assert "differ" in check_params(["a", "b", "c"], exact=True)(original_fn)
    assert check_params(["a", "b"], exact=True)(original_fn) is None
    assert "differ" in check_params(["b", "a"])(original_fn)


def test_importing_integrations_imports_no_trainer():
    code = ("import sys, fastrlhf, fastrlhf.integrations, fastrlhf.integrations.trl, fastrlhf.integrations.verl, "
            "fastrlhf.integrations.openrlhf; bad = [m for m in ('trl', 'verl', 'openrlhf') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
