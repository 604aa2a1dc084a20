"""Every documented public name resolves from the top-level package."""

import tinyclip_fast


def test_every_export_resolves():
    for name in tinyclip_fast.__all__:
        assert getattr(tinyclip_fast, name) is not None, name


def test_unknown_name_raises_attribute_error():
    try:
        tinyclip_fast.does_not_exist  # noqa: B018
    except AttributeError as error:
        assert "does_not_exist" in str(error)
    else:
        raise AssertionError("expected AttributeError")
