"""Where a circuit's dictionaries come from: the run's own SAEs, or dictionaries a researcher brings.

``circuit.dictionaries`` is unset (the run's ``saes/step<N>/<site>``), a folder, or a mapping site -> folder.
A folder may hold, one subfolder per site:
- sfcd's or SAELens's layout, named by sfcd site (``resid.0``) or read from each ``cfg.json``'s ``hook_name``
  (TransformerLens names: ``blocks.<l>.hook_resid_post``, ``hook_attn_out``, ``hook_mlp_out``, ``hook_embed``);
- the Sparse Feature Circuits release (dictionary_learning): ``embed``, ``attn_out_layer<i>``,
  ``mlp_out_layer<i>``, ``resid_out_layer<i>``, each holding ``<set>/ae.pt`` (with or without ``config.json``);
- sparsify's: subfolders named by the module they read (``gpt_neox.layers.<l>``, ``...layers.<l>.mlp``, ...);
- sfcd's crosscoders (``crosscoders/<site>/``): at a checkpoint the crosscoder was trained on, the site's dictionary
  is that checkpoint alone (:func:`sfcd.crosscoders.view.alone_view`: the crosscoder's own latents, the other
  checkpoints at their mean activation), so a latent id is the same feature at every checkpoint and nothing from
  another checkpoint's tokens reaches the circuit; ``crosscoder_view="joint"`` opts in to
  :class:`sfcd.crosscoders.view.JointView` (the other checkpoints' models run on the same tokens).
Each dictionary is loaded with :func:`sfcd.sae.io.load_dictionary` (an SAE, or a transcoder) and checked against the
site's width.

Transcoders (sparsify's layout, ``transcode: true`` in ``cfg.json``; sfcd's ``transcoders/step<N>/``) are the
dictionaries of ``mlp.<l>`` sites: a folder may hold them beside SAEs, named by sfcd site (``mlp.1``) or by
sparsify hookpoint (``gpt_neox.layers.1.mlp``, or ``layers.1.mlp`` under the model's base module).
``circuit.transcoders=true`` takes the run's own (``transcoders/step<N>/mlp.<l>``) at every MLP site and the
dictionaries above elsewhere. A transcoder is checked against the widths of the MLP's input and output
(:func:`check_transcoder_fits`).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from sfcd.circuits.splice import Identity
from sfcd.crosscoders.io import block_index, is_crosscoder, load_crosscoder
from sfcd.errors import ConfigError, InputError, MissingArtifactError
from sfcd.io import read_json
from sfcd.models.sites import Site, mlp_input_site, parse_site, site_dim, site_of_module
from sfcd.paths import RunDir
from sfcd.sae.io import load_dictionary
from sfcd.sae.stage import check_sae_fits

_PAPER = re.compile(r"^(embed)$|^(attn_out|mlp_out|resid_out)_layer(\d+)$")
_PAPER_KIND = {"attn_out": "attn", "mlp_out": "mlp", "resid_out": "resid"}
_TL = re.compile(r"^blocks\.(\d+)\.hook_(resid_post|attn_out|mlp_out)$")
_TL_KIND = {"resid_post": "resid", "attn_out": "attn", "mlp_out": "mlp"}


def _paper_site(name: str) -> str | None:
    m = _PAPER.match(name)
    if not m:
        return None
    return "embed" if m.group(1) else f"{_PAPER_KIND[m.group(2)]}.{m.group(3)}"


def _hook_site(folder: Path) -> str | None:
    """A SAELens folder's site from its ``cfg.json``: sfcd's own ``sfcd_site`` or a TransformerLens hook name."""
    cfg_path = folder / "cfg.json"
    if not cfg_path.exists():
        return None
    cfg = read_json(cfg_path)
    meta = cfg.get("metadata", {}) if isinstance(cfg.get("metadata"), dict) else {}
    if meta.get("sfcd_site") or cfg.get("sfcd_site"):
        return meta.get("sfcd_site") or cfg.get("sfcd_site")
    hook = meta.get("hook_name") or cfg.get("hook_name") or ""
    if hook == "hook_embed":
        return "embed"
    m = _TL.match(hook)
    return f"{_TL_KIND[m.group(2)]}.{m.group(1)}" if m else None


def _holds_sae(folder: Path) -> bool:
    return any((folder / f).exists() for f in ("sae_weights.safetensors", "ae.pt", "sae.safetensors")) or (
        is_crosscoder(folder)
    )


#: base modules of the architectures sfcd knows: sparsify names hookpoints under ``model.base_model``
_BASES = ("gpt_neox.", "transformer.")


def _module_site(name: str) -> str | None:
    """The site a module path names, full (``gpt_neox.layers.1.mlp``) or under the base module (``layers.1.mlp``,
    sparsify's hookpoints)."""
    return site_of_module(name) or next((s for b in _BASES if (s := site_of_module(b + name))), None)


def _paper_set(folder: Path) -> Path:
    """``<site>/<set>/ae.pt``: the one set folder (or ``ae.pt`` right in the site folder)."""
    if _holds_sae(folder):
        return folder
    sets = sorted(p for p in folder.iterdir() if p.is_dir() and _holds_sae(p))
    if len(sets) != 1:
        found = ", ".join(p.name for p in sets) or "none"
        raise InputError(
            f"{folder}: expected one dictionary set folder holding ae.pt (the paper's layout "
            f"<site>/<set>/ae.pt), found {found}; point circuit.dictionaries at the set with a mapping "
            "site -> folder"
        )
    return sets[0]


def folders_in(root: Path) -> dict[str, Path]:
    """The dictionaries in ``root`` by sfcd site name, whatever the layout (see the module's docstring)."""
    if not root.is_dir():
        raise MissingArtifactError(f"circuit.dictionaries: {root} is not a folder")
    out: dict[str, Path] = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        site = _paper_site(sub.name)
        if site is not None:
            out[site] = _paper_set(sub)
            continue
        if not _holds_sae(sub):
            continue
        try:
            site = parse_site(sub.name).name
        except ConfigError:
            site = _module_site(sub.name) or _hook_site(sub)
        if site is not None:
            out[site] = sub
    if not out:
        raise InputError(
            f"circuit.dictionaries: no dictionary layout recognised in {root}; expected one subfolder per site "
            "named by sfcd site (resid.0), by the paper's names (embed, attn_out_layer<i>, mlp_out_layer<i>, "
            "resid_out_layer<i>, each with <set>/ae.pt), by module path (sparsify: gpt_neox.layers.<l>, "
            "layers.<l>.mlp for a transcoder), or SAELens folders whose cfg.json names a hook"
        )
    return out


def dictionary_folders(spec, run: RunDir, step: int, sites: list[Site], transcoders: bool = False) -> dict[Site, Path]:
    """The folder of each site's dictionary: ``spec`` None (the run's SAEs at ``step``), a folder, or a
    mapping site -> folder; with ``transcoders``, the run's transcoders at ``step`` at the ``mlp.<l>`` sites (and
    ``spec`` for the others). A site without one is an error naming what there is."""
    out: dict[Site, Path] = {}
    if transcoders:
        mlps = [s for s in sites if s.kind == "mlp"]
        if not mlps:
            raise ConfigError(
                f"circuit.transcoders=true replaces MLPs, but circuit.sites {[s.name for s in sites]} has no mlp.<l>"
            )
        folder = run.transcoders(step)
        missing = [s.name for s in mlps if not (folder / s.name / "metrics.json").exists()]
        if missing:
            raise MissingArtifactError(
                f"no transcoders for sites {missing} in {folder}; train them with `sfcd sae run_dir={run.root} "
                f"step={step} sae.transcoders=[{','.join(missing)}]`, or bring them with circuit.dictionaries=<folder>"
            )
        out = {s: folder / s.name for s in mlps}
        sites = [s for s in sites if s not in out]
        if not sites:
            return out
    if spec is None:
        folder = run.root / "saes" / f"step{step}"
        missing = [s.name for s in sites if not (folder / s.name / "metrics.json").exists()]
        if missing:
            raise MissingArtifactError(
                f"no SAEs for sites {missing} in {folder}; train them with "
                f"`sfcd sae run_dir={run.root} step={step} sae.sites=[{','.join(missing)}]`, or bring "
                "dictionaries with circuit.dictionaries=<folder>"
            )
        return out | {s: folder / s.name for s in sites}
    if isinstance(spec, DictConfig):
        spec = OmegaConf.to_container(spec, resolve=True)
    if isinstance(spec, dict):
        found = {parse_site(str(k)).name: Path(str(v)) for k, v in spec.items()}
        where = "the circuit.dictionaries mapping"
    else:
        found = folders_in(Path(str(spec)))
        where = str(spec)
    missing = [s.name for s in sites if s.name not in found]
    if missing:
        raise MissingArtifactError(
            f"circuit.dictionaries: no dictionary for sites {missing} in {where} (it has {sorted(found)}); "
            "add them or choose circuit.sites among those"
        )
    return out | {s: found[s.name] for s in sites}


def check_transcoder_fits(tc, model, site: Site) -> None:
    """A clear error when a transcoder does not replace ``site``'s MLP: ``site`` is not ``mlp.<l>``, or its input
    or output width is not the MLP's."""
    if site.kind != "mlp":
        raise InputError(f"a transcoder replaces an MLP: its site is mlp.<l>, not {site.name}")
    d_in, d_out = site_dim(model, mlp_input_site(site)), site_dim(model, site)
    if (tc.d_in, tc.d_out) != (d_in, d_out):
        raise InputError(
            f"the transcoder maps {tc.d_in} -> {tc.d_out} dimensions but the MLP of {site.name} in this model maps "
            f"{d_in} -> {d_out}; use a transcoder trained on this model's MLP"
        )


def load_dictionaries(
    model,
    sites: list[Site],
    folders: dict[Site, Path] | None,
    step: int | None = None,
    crosscoder_view: str = "alone",
) -> dict[Site, torch.nn.Module]:
    """The dictionary of each site from ``folders`` (see :func:`dictionary_folders`), on the model's device;
    ``folders=None``: identity dictionaries (the neuron baseline). A crosscoder folder gives checkpoint ``step``
    (``model``'s) alone; ``crosscoder_view="joint"``: the joint view attached to ``model``, the other checkpoints'
    models loaded once."""
    device = next(model.parameters()).device
    if folders is None:
        return {s: Identity(site_dim(model, s)).to(device) for s in sites}
    dicts = {}
    others: dict[int, torch.nn.Module] = {}
    for s in sites:
        if is_crosscoder(folders[s]):
            dicts[s] = _crosscoder_view(model, s, folders[s], step, others, crosscoder_view)
            continue
        d = load_dictionary(folders[s])  # an SAE, or a transcoder (sparsify's transcode layout)
        try:
            (check_transcoder_fits if d.is_transcoder else check_sae_fits)(d, model, s)
        except InputError as e:
            raise InputError(f"{folders[s]}: {e}") from None
        dicts[s] = d.eval().to(device)
    return dicts


def _crosscoder_view(
    model, site: Site, folder: Path, step: int | None, others: dict, how: str = "alone"
) -> torch.nn.Module:
    from sfcd.crosscoders.view import VIEWS, JointView, alone_view
    from sfcd.models.loading import load_model

    if how not in VIEWS:
        raise ConfigError(f"crosscoder view {how!r}; expected one of {list(VIEWS)}")
    cc = load_crosscoder(folder)
    if cc.cfg.get("site") != site.name:
        raise InputError(f"{folder}: a crosscoder of site {cc.cfg.get('site')}, not {site.name}")
    if step is None:
        raise ConfigError(f"{folder} is a crosscoder: its dictionary needs the checkpoint (step)")
    m = block_index(cc, step)
    device = next(model.parameters()).device
    if how == "alone":
        try:
            view = alone_view(cc.to(device), m)
        except MissingArtifactError as e:
            raise MissingArtifactError(f"{folder}: {e}") from None
        try:
            check_sae_fits(view, model, site)
        except InputError as e:
            raise InputError(f"{folder}: {e}") from None
        return view
    steps = list(cc.cfg["steps"])
    for j, st in enumerate(steps):
        if j != m and st not in others:
            others[st] = load_model(cc.cfg["model_source"], st, dtype=next(model.parameters()).dtype).to(device)
            others[st].requires_grad_(False)
    view = JointView(cc.to(device), m, site, {j: others[st] for j, st in enumerate(steps) if j != m})
    try:
        check_sae_fits(view, model, site)
    except InputError as e:
        raise InputError(f"{folder}: {e}") from None
    view.attach(model)
    return view
