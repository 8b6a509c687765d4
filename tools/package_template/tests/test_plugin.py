"""ds finds {{module}} through its entry point, next to core and nothing else."""

from __future__ import annotations

from ds.core.plugins import load_components, make_plugin_set


def test_plugin_loads_from_its_entry_point() -> None:
    plugins = make_plugin_set(autoload=False, allow={"{{name}}"})
    assert [plugin.name for plugin in plugins.loaded] == ["core", "{{name}}"]
    assert plugins.failures == []


def test_report_names_the_installed_version() -> None:
    components = load_components(make_plugin_set(autoload=False, allow={"{{name}}"}))
    lines = components.hook.ds_report_lines()
    assert ["ds-{{name}} {{version}}"] in lines
