"""The hardware picker: a form whose choices become the defaults of later `%%fabric` cells."""

from __future__ import annotations

import html
import os
import warnings
from typing import Any

from nbfabric.config import PRECISIONS, STRATEGIES, RunConfig, devices_value
from nbfabric.devices import Hardware, describe_hardware, detect_hardware, gpu_name
from nbfabric.user_config import config_path, load_defaults, save_defaults

FORM_SETTINGS = ("accelerator", "devices", "strategy", "precision", "num_nodes")


def unsupported_precisions(accelerator: str) -> dict[str, str]:
    """The precisions `accelerator` cannot run, each with the reason."""
    reasons = {}
    for precision in PRECISIONS:
        try:
            RunConfig(accelerator, (0,), "single_device", precision)
        except ValueError as error:
            reasons[precision] = str(error)
    return reasons


class Picker:
    """The form: accelerator, devices, strategy, precision, nodes; the equivalent `%%fabric` line
    and `nbfabric run` command; a Save button that writes the choice as the user's defaults.

    Valid choices become the defaults of `magics` (the notebook's `%%fabric`); an invalid
    combination is shown in the form and changes nothing.
    """

    def __init__(self, magics: Any = None, config: str | os.PathLike | None = None, hardware: Hardware | None = None):
        import ipywidgets as widgets

        self.magics = magics
        self.config_path = config
        self.hardware = detect_hardware() if hardware is None else hardware
        self.error: str | None = None
        start = self._starting_values()
        wide = {"style": {"description_width": "90px"}, "layout": widgets.Layout(width="360px")}
        self.accelerator = widgets.Dropdown(options=self._accelerator_options(), value=start["accelerator"], description="accelerator", **wide)
        self.devices = widgets.Text(value=start["devices"], description="devices", placeholder="a count, or GPU indices such as 0,2", continuous_update=False, **wide)
        self.strategy = widgets.Dropdown(options=STRATEGIES, value=start["strategy"], description="strategy", **wide)
        self.precision = widgets.Dropdown(description="precision", **wide)
        self.num_nodes = widgets.BoundedIntText(value=start["num_nodes"], min=1, max=4096, description="nodes", **wide)
        self.precision_note = widgets.HTML()
        self.message = widgets.HTML()
        self.magic_line = widgets.HTML()
        self.command = widgets.HTML()
        self.save_button = widgets.Button(
            description="Save as default", icon="save", tooltip="write these settings to the nbfabric settings file", layout=widgets.Layout(width="auto")
        )
        self.save_status = widgets.HTML()
        self._set_precision_options(start["precision"])
        self.save_button.on_click(lambda _: self.save())
        self.accelerator.observe(self._on_accelerator, names="value")
        for control in (self.devices, self.strategy, self.precision, self.num_nodes):
            control.observe(lambda _: self.update(), names="value")
        self.widget = widgets.VBox(
            [
                widgets.HTML(f"<b>nbfabric</b> · {html.escape(describe_hardware(self.hardware))}"),
                self.accelerator,
                self.devices,
                self.strategy,
                self.precision,
                self.precision_note,
                self.num_nodes,
                self.message,
                self.magic_line,
                self.command,
                widgets.HBox([self.save_button, self.save_status], layout=widgets.Layout(align_items="center")),
            ],
            layout=widgets.Layout(border="1px solid #ddd", padding="4px 8px"),
        )
        self.update()

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        bundle = self.widget._repr_mimebundle_(**kwargs)
        bundle["text/plain"] = f"nbfabric picker ({describe_hardware(self.hardware)}): {self.summary()}"
        return bundle

    def summary(self) -> str:
        """The `%%fabric` line the form stands for, or what is wrong with it."""
        return self.error or html.unescape(self.magic_line.value.removeprefix("<code>").removesuffix("</code>"))

    def settings(self) -> dict[str, Any]:
        """The form's values, as `%%fabric` and the settings file take them."""
        return {
            "accelerator": self.accelerator.value,
            "devices": devices_value(self.devices.value),
            "strategy": self.strategy.value,
            "precision": self.precision.value,
            "num_nodes": self.num_nodes.value,
        }

    def update(self) -> None:
        """Check the combination; show it as flags and apply it to `%%fabric`, or show what is wrong."""
        settings = self.settings()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                config = RunConfig.resolve(**settings, start_method=self._start_method(), hardware=self.hardware)
        except ValueError as error:
            self.error = str(error)
            self.message.value = f"<span style='color:#c5221f'>✗ {html.escape(self.error)}</span>"
            self.save_button.disabled = True
            return
        self.error = None
        self.save_button.disabled = False
        if self.magics is not None:
            self.magics.defaults.update(settings)
        applied = "applied to the next %%fabric cells" if self.magics is not None else "valid"
        self.message.value = f"<span style='color:#188038'>✓ {applied}</span>"
        self.magic_line.value = f"<code>%%fabric {html.escape(config.as_flags())}</code>"
        self.command.value = f"<code>nbfabric run train.py {html.escape(config.as_flags())}</code>"

    def save(self) -> None:
        """Write the current choice to the settings file (keeping its other settings)."""
        path = self.config_path if self.config_path is not None else config_path()
        try:
            saved = {**_readable_defaults(path), **self.settings()}
            written = save_defaults(saved, path)
        except (OSError, ValueError) as error:
            self.save_status.value = f"<span style='color:#c5221f'>not saved: {html.escape(str(error))}</span>"
            return
        self.save_status.value = f"saved to <code>{html.escape(str(written))}</code>"

    def _effective_defaults(self) -> dict[str, Any]:
        return {**_readable_defaults(self.config_path), **(self.magics.defaults if self.magics is not None else {})}

    def _start_method(self) -> str | None:
        """The start method in effect, which the form does not set but must agree with (None: not set)."""
        return self._effective_defaults().get("start_method")

    def _starting_values(self) -> dict[str, Any]:
        settings = self._effective_defaults()
        known = {name: settings[name] for name in FORM_SETTINGS if name in settings}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                config = RunConfig.resolve(**known, hardware=self.hardware)
        except ValueError:
            config = RunConfig.resolve(hardware=self.hardware)
        strategy = str(known.get("strategy", "auto")).lower()
        return {
            "accelerator": config.accelerator,
            "devices": config.devices_flag,
            "strategy": strategy if strategy in STRATEGIES else config.strategy,
            "precision": config.precision,
            "num_nodes": config.num_nodes,
        }

    def _accelerator_options(self) -> list[tuple[str, str]]:
        hardware = self.hardware
        labels = {
            "cuda": "cuda · " + ", ".join(gpu_name(gpu) for gpu in hardware.gpus),
            "mps": "mps · Apple GPU",
            "cpu": f"cpu · {hardware.cpu_count} cores",
        }
        return [(labels[name], name) for name in hardware.accelerators()]

    def _on_accelerator(self, _: Any) -> None:
        self._set_precision_options(self.precision.value)
        self.update()

    def _set_precision_options(self, wanted: str | None) -> None:
        unsupported = unsupported_precisions(self.accelerator.value)
        options = [precision for precision in PRECISIONS if precision not in unsupported]
        self.precision.options = options
        self.precision.value = wanted if wanted in options else options[0]
        self.precision_note.value = "".join(
            f"<div style='color:#777;font-size:90%'>not offered: {html.escape(why)}</div>" for why in unsupported.values()
        )


def picker(config: str | os.PathLike | None = None) -> Picker:
    """Show the hardware picker; its choices become the defaults of later `%%fabric` cells.

    `config`: the settings file its Save button writes (default: `$NBFABRIC_CONFIG`, else the
    user's nbfabric config directory).
    """
    return Picker(_notebook_magics(), config)


def _notebook_magics() -> Any:
    """The `%%fabric` magics of the running IPython (registered here if `%load_ext nbfabric` was not run)."""
    from IPython import get_ipython

    shell = get_ipython()
    if shell is None:
        return None
    registry = shell.magics_manager.registry
    if "FabricMagics" not in registry:
        from nbfabric.notebook import load_ipython_extension

        load_ipython_extension(shell)
    return registry["FabricMagics"]


def _readable_defaults(path: str | os.PathLike | None) -> dict[str, Any]:
    try:
        return load_defaults(path)
    except ValueError:
        return {}
