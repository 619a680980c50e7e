"""A resume folder is recognised by the next process: the model identity in its fingerprint does not depend on the
process (diffusers lists `_use_default_values` from a set, whose order changes with Python's hash seed)."""

from diffusers import AutoencoderKLWan
from diffusers.configuration_utils import FrozenDict

from skyreels_diffusers.app.tiny import TINY_VAE_CONFIG
from skyreels_diffusers.pipelines.resume import fingerprint, module_identity


def test_module_identity_ignores_the_order_of_default_value_names():
    """Before: another process (another hash seed) listed the names in another order, the fingerprint changed and
    a killed talking-avatar run restarted by a new process had its resume folder refused as "a different run"."""
    vae = AutoencoderKLWan(**TINY_VAE_CONFIG)
    names = list(vae.config["_use_default_values"])
    assert len(names) > 1
    identity = module_identity(vae)
    vae._internal_dict = FrozenDict({**vae.config, "_use_default_values": names[::-1]})  # as another process lists it
    assert module_identity(vae) == identity
    assert fingerprint([module_identity(vae)]) == fingerprint([identity])
    vae._internal_dict = FrozenDict({**vae.config, "base_dim": 4})  # a real change still shows
    assert module_identity(vae) != identity
