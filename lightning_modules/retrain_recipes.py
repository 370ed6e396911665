"""Which retraining recipe and network size a genotype gets, decided once its space is known.

``retrain=default`` (conf/retrain/default.yaml) leaves the recipe's values null; they come from
conf/retrain/<space>.yaml when the package has one (nb201: NAS-Bench-201's own recipe) and from
DARTS' recipe for every other space. ``oneshot-retrain`` learns the space only from the genotype,
after Hydra composed the config, so the choice cannot live in a defaults list; ``oneshot-search``
goes through the same function so both apps give one genotype the same recipe. Network sizes of
``oneshot-retrain`` follow the space's ``size`` preset (conf/space/<space>.yaml) the same way.
"""

from __future__ import annotations

from importlib import resources

from omegaconf import DictConfig, OmegaConf

from oneshot.data import cutout_pixels, load_splits, val_images

FALLBACK_RECIPE = "darts"


def packaged_config(group: str, name: str) -> DictConfig | None:
    """conf/<group>/<name>.yaml as shipped in the package (source checkout or wheel), or None."""
    path = resources.files("oneshot.conf").joinpath(group, f"{name}.yaml")
    return OmegaConf.create(path.read_text()) if path.is_file() else None


def recipe_names() -> list[str]:
    """The complete recipes: retrain/*.yaml whose ``recipe`` key names the file itself."""
    folder = resources.files("oneshot.conf").joinpath("retrain")
    names = sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))
    return [n for n in names if packaged_config("retrain", n).get("recipe") == n]


def _set_values(node):
    """A plain container without its null leaves: what the user, an experiment or a recipe set."""
    if isinstance(node, dict):
        return {k: v for k, v in ((k, _set_values(v)) for k, v in node.items()) if v is not None}
    return node


def resolve_recipe(cfg: DictConfig, space: str | None) -> DictConfig:
    """``cfg.retrain`` with its null values filled from the space's recipe, validated.

    A complete recipe (``retrain=darts``, ``retrain=nb201``) comes back unchanged. Raises one-line
    ValueErrors naming the key for values that would run and silently give a wrong result.
    """
    own = _set_values(OmegaConf.to_container(cfg.retrain, resolve=True))
    names = recipe_names()
    name = own.get("recipe") or (space if space in names else FALLBACK_RECIPE)
    recipe = OmegaConf.merge(packaged_config("retrain", name) if name in names else {}, own)
    # A recipe of the user's own (retrain=mine via hydra.searchpath) must be complete.
    if any(recipe.get(key) is None for key in packaged_config("retrain", FALLBACK_RECIPE)):
        raise ValueError(f"retrain.recipe={name} is not a recipe; valid: {', '.join(names)}")
    recipe.recipe = name
    _check(recipe, cfg)
    return recipe


def _check(recipe: DictConfig, cfg: DictConfig) -> None:
    """Range checks of the keys recipes added (``val_split``) or changed (``cutout``)."""
    cutout_pixels(recipe.cutout, 32, key="retrain.cutout")
    if not recipe.grad_clip >= 0:  # torch clips to |max_norm| with a sign flip: gradient ascent
        raise ValueError(f"retrain.grad_clip={recipe.grad_clip} is out of range; valid: >= 0 (0 = off)")
    val_images(recipe.val_split, None, key="retrain.val_split")
    if isinstance(recipe.val_split, int) and recipe.val_split > 0:  # a count: needs the set's size
        data = cfg.data
        options = {k: data.get(k) for k in ("root", "download", "path", "test_path", "image_size")}
        n = len(load_splits(data.name, **options).y_train[: data.get("limit")])  # cached: loaded once
        val_images(recipe.val_split, n, key="retrain.val_split")


def network_size(space: str, size: str, network: DictConfig) -> dict:
    """Sizes of a ``space`` network: the space's ``size`` preset, then every non-null ``network``
    value (``network.C=16``). A space without a packaged config keeps its builder's defaults."""
    chosen = _set_values(OmegaConf.to_container(network, resolve=True))
    space_cfg = packaged_config("space", space)
    if space_cfg is None or "network" not in space_cfg:
        return chosen
    presets = list(space_cfg.get("presets") or {})
    if presets and size not in presets:
        raise ValueError(f"size={size} is not a preset of space {space}; valid: {', '.join(presets)}")
    # The space's network node interpolates ${size} and ${space.presets...}: resolve it in place.
    root = OmegaConf.create({"size": size, "space": space_cfg})
    return {**OmegaConf.to_container(root.space.network, resolve=True), **chosen}
