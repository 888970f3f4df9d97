import types

import hivecli
import hivecli.averaging
import hivecli.dht
import hivecli.net
import hivecli.optim
import hivecli.testing


def _public_names(module):
    return {
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType) and name not in {"annotations"}
    }


def test_all_is_sorted_and_complete():
    for module in (hivecli, hivecli.net, hivecli.dht, hivecli.averaging, hivecli.optim):
        assert module.__all__ == sorted(module.__all__)
        lazy = set(getattr(module, "_LAZY", {}))  # torch-backed names load on first use
        assert _public_names(module) | lazy == set(module.__all__) - {"__version__"}, module.__name__
        for name in module.__all__:
            assert getattr(module, name) is not None


def test_quickstart_names_exist():
    assert callable(hivecli.DHT) and callable(hivecli.get_dht_time)
    assert set(hivecli.testing.__all__) <= set(dir(hivecli.testing))
