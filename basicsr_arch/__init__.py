"""BasicSR plug-in for DMDNet: importing this package registers the arch, model and dataset."""

from . import compat, dmdnet_arch, dmdnet_dataset, dmdnet_model  # noqa: F401  (registration)

compat.apply()
