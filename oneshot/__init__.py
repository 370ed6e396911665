"""oneshot: differentiable one-shot neural architecture search.

The library (ops, mixed op, spaces, genotypes, derivation, metrics, pruning, controller) is plain
PyTorch. ``search(cfg)`` and ``retrain(cfg)`` run the Lightning pipeline the command-line apps
run, imported on first use so that ``import oneshot`` stays light.
"""

__version__ = "0.1.0"


def search(cfg):
    """Search, derive and retrain as ``oneshot-search`` does; returns the report dict."""
    from oneshot.validate import check_config

    check_config(cfg)  # before the heavy imports: a bad value is one line, nothing created
    from oneshot.lightning_modules.pipeline import search as _search
    from oneshot.quiet import quiet_libraries

    quiet_libraries()

    return _search(cfg)


def retrain(cfg):
    """Retrain ``cfg.genotype`` as ``oneshot-retrain`` does; returns the report dict."""
    from oneshot.validate import check_config

    check_config(cfg)  # before the heavy imports: a bad value is one line, nothing created
    from oneshot.lightning_modules.pipeline import retrain as _retrain
    from oneshot.quiet import quiet_libraries

    quiet_libraries()

    return _retrain(cfg)


def compose(config_name: str = "search", overrides=()):
    """The app's config with command-line style overrides, for notebooks and scripts."""
    from hydra import compose as _compose
    from hydra import initialize_config_module

    with initialize_config_module(config_module="oneshot.conf", version_base="1.3"):
        return _compose(config_name=config_name, overrides=list(overrides))


def load_network(path):
    """An exported ``network.pt`` (retrain stage) rebuilt with its trained weights."""
    from oneshot.lightning_modules.pipeline import load_network as _load

    return _load(path)


def fix(model_or_config, arch):
    """The plain network of ``arch`` (``{label: value}``, an ``arch.json``) for a model written
    with ``oneshot.nn`` choices (issue 15; ``oneshot.spaces.model.fix``)."""
    from oneshot.spaces.model import fix as _fix

    return _fix(model_or_config, arch)
