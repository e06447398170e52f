"""The SD-VAE (diffusers' ``AutoencoderKL``): it encodes the latent store (``dfm prepare encode``) and decodes
generated latents back to images (training grids, ``dfm sample``, ``dfm generate``).

A store records the VAE that made it (:class:`VaeSpec`: the local folder or hub name, the subfolder, the
``scaling_factor`` and ``shift_factor``) in its manifest, and training draws latents as
``(z - shift_factor) * scaling_factor`` (0.18215 and 0 for the SD VAE). Decoding inverts exactly that,
``vae.decode(x / scaling_factor + shift_factor)`` (:class:`LatentDecoder`), with the factors the store
recorded. :func:`resolve_decoder` finds the VAE of a latent run: ``--vae`` when given, else the one its store
recorded; when there is none it says so in one line and the caller shows latent channels instead.

diffusers is imported on first use only: pixel runs never need it.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from urllib.parse import urlparse

import torch

from dfm.data.store import LATENT_SCALE, MANIFEST, StoreError, resolve_store_dir

DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"  # the SD VAE the seed's encode step uses


class VaeError(ValueError):
    """A VAE that cannot be found or read; the message names it."""


@dataclass(frozen=True)
class VaeSpec:
    """What decodes a store's latents: the VAE (an absolute local folder or a hub name) and its factors."""

    source: str
    subfolder: str | None = None
    scaling_factor: float = LATENT_SCALE
    shift_factor: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_manifest(cls, manifest: dict) -> VaeSpec | None:
        """The VAE a store manifest records (None if it records none). Stores from before the VAE was recorded
        as a mapping hold its name as a string beside ``scale``."""
        vae = manifest.get("vae")
        if isinstance(vae, str):
            return cls(vae, None, float(manifest.get("scale", LATENT_SCALE)), float(manifest.get("shift", 0.0)))
        if isinstance(vae, dict) and vae.get("source"):
            keys = ("subfolder", "scaling_factor", "shift_factor")
            return cls(str(vae["source"]), **{k: vae[k] for k in keys if vae.get(k) is not None})
        return None


def _first_line(err: BaseException) -> str:
    text = " ".join(str(err).split()).rstrip(".") or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _hub_unreachable() -> str | None:
    """Why the Hugging Face hub (``HF_ENDPOINT``) cannot be reached, or None; a 5 s probe. Without it an
    offline lookup retries for ~30 s before failing."""
    from huggingface_hub import constants  # local: with diffusers, loaded only when a VAE is used

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=5).close()
    except OSError as err:
        return f"{url.hostname}: {_first_line(err)}"
    return None


def _load_config(source: str, subfolder: str | None, local_only: bool) -> dict:
    from diffusers import AutoencoderKL  # local: diffusers takes seconds to import and only latent runs need it

    with warnings.catch_warnings():  # diffusers passes huggingface_hub an argument it deprecated
        warnings.simplefilter("ignore")
        return AutoencoderKL.load_config(source, subfolder=subfolder, local_files_only=local_only)


def looks_like_path(name: str) -> bool:
    """Whether ``--vae`` names a local path rather than a hub repository (``owner/name``, one slash at most):
    it starts with ``/``, ``./``, ``../`` or ``~``, or has more separators than a hub name can have."""
    name = name.replace(os.sep, "/")
    return name.startswith(("/", "./", "../", "~")) or name in (".", "..") or name.count("/") > 1


def vae_spec(vae: str, subfolder: str | None = None) -> VaeSpec:
    """Read the VAE's config (no weights) and return its spec; a local folder is recorded by absolute path, a hub
    name is looked up in the Hugging Face cache first, then on the hub.

    Raises :class:`VaeError` in one line when the config cannot be read: a folder that holds no VAE, or a hub
    name neither cached nor reachable.
    """
    local = Path(vae).expanduser()
    if looks_like_path(vae) and not local.exists():
        raise VaeError(f"VAE folder {vae} does not exist (looked for {local.absolute()}; a hub name is owner/name)")
    source = str(local.resolve()) if local.exists() else vae
    try:
        config = _load_config(source, subfolder, local_only=True)
    except Exception as err:  # diffusers and huggingface_hub raise OSError, HFValidationError, HTTP errors...
        if local.exists():
            raise VaeError(f"VAE folder {source} holds no diffusers AutoencoderKL: {_first_line(err)}") from None
        offline = _hub_unreachable()
        if offline is not None:
            raise VaeError(
                f"VAE {vae!r} is neither a local folder nor in the Hugging Face cache, and the hub cannot be reached "
                f"({offline}): download it where there is network (huggingface-cli download {vae}), or pass a "
                "local folder holding a diffusers AutoencoderKL (save_pretrained)"
            ) from None
        try:
            config = _load_config(source, subfolder, local_only=False)
        except Exception as err:
            raise VaeError(f"VAE {vae!r} is not a local folder, and the hub has none: {_first_line(err)}") from None
    scaling = config.get("scaling_factor") or LATENT_SCALE
    shift = config.get("shift_factor") or 0.0
    return VaeSpec(source, subfolder, float(scaling), float(shift))


def vae_checksum(spec: VaeSpec) -> str | None:
    """What tells two VAEs of one name apart: ``sha256:<hex>`` over a local folder's config and weight files
    (names and bytes), ``revision:<commit>`` of a hub name's cached snapshot (the commit fixes its files, some of
    which may not be downloaded yet); None when neither can be read on this machine."""
    folder = Path(spec.source)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            snapshot = Path(snapshot_download(spec.source, local_files_only=True))  # .../snapshots/<commit>
        except Exception:  # not in the cache
            return None
        return f"revision:{snapshot.name}"
    folder = folder / spec.subfolder if spec.subfolder else folder
    files = sorted(p for p in folder.iterdir() if p.name == "config.json" or p.suffix in (".safetensors", ".bin"))
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def load_vae(vae: str, subfolder: str | None = None, device: str | torch.device = "cpu"):
    """diffusers ``AutoencoderKL`` from a local folder or a hub name, in eval mode on ``device``, fp32."""
    from diffusers import AutoencoderKL  # local: see _load_config

    model = AutoencoderKL.from_pretrained(vae, subfolder=subfolder, low_cpu_mem_usage=False)
    return model.to(device).eval().requires_grad_(False)


class LatentDecoder:
    """Model-space latents ``(N, C, h, w)`` -> images ``(N, 3, H, W)`` in [-1, 1] through the VAE of ``spec``,
    ``batch_size`` latents per decode call (bounds the decoder's activation memory)."""

    def __init__(self, vae, spec: VaeSpec, batch_size: int = 32):
        self.vae, self.spec, self.batch_size = vae, spec, batch_size

    @classmethod
    def load(cls, spec: VaeSpec, device: str | torch.device = "cpu", batch_size: int = 32) -> LatentDecoder:
        return cls(load_vae(spec.source, spec.subfolder, device), spec, batch_size)

    @torch.no_grad()
    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        vae = self.vae.to(z.device)
        s, shift = self.spec.scaling_factor, self.spec.shift_factor
        chunks = [vae.decode(chunk.float() / s + shift).sample for chunk in z.split(self.batch_size)]
        return torch.cat(chunks).float()


def store_vae(data_dir: str | Path | None) -> tuple[VaeSpec | None, str]:
    """The VAE the latent store at ``data_dir`` records, or None and the reason (one sentence)."""
    if not data_dir:
        return None, "the run names no latent store"
    try:
        root = resolve_store_dir(data_dir)
        manifest = json.loads((root / MANIFEST).read_text())
    except (StoreError, OSError, ValueError) as err:
        return None, f"its latent store cannot be read ({_first_line(err)})"
    spec = VaeSpec.from_manifest(manifest)
    return spec, "" if spec is not None else f"its latent store {root} records no VAE"


def resolve_decoder(cfg, vae: str | None = None, device: str | torch.device = "cpu", batch_size: int = 32):
    """``(LatentDecoder or None, note)`` for a run config: the VAE at ``vae`` when given (a :class:`VaeError` if it
    cannot be read), else the one the run's latent store recorded. Latents are decoded with the store's
    factors when it has them (they scaled the training latents), else with the VAE's own. ``note`` is one line
    saying which VAE decodes, or why none does; pixel runs get ``(None, "")``."""
    if cfg.data.kind != "latents":
        if vae:
            raise VaeError(f"--vae was given but the run models pixels (data.kind={cfg.data.kind})")
        return None, ""
    recorded, why = store_vae(cfg.data.data_dir)
    if vae:
        spec = vae_spec(vae)
        if recorded is not None:
            spec = replace(spec, scaling_factor=recorded.scaling_factor, shift_factor=recorded.shift_factor)
        return LatentDecoder.load(spec, device, batch_size), f"decoding with the VAE {spec.source} (--vae)"
    if recorded is None:
        return None, f"no VAE to decode with: {why}, and no --vae was given"
    try:
        decoder = LatentDecoder.load(recorded, device, batch_size)
    except Exception as err:  # a hub name offline, a folder moved since the store was encoded
        return None, f"no VAE to decode with: the store's VAE {recorded.source} cannot be loaded ({_first_line(err)})"
    return decoder, f"decoding with the VAE {recorded.source} (recorded in the latent store)"


__all__ = [
    "DEFAULT_VAE",
    "LatentDecoder",
    "VaeError",
    "VaeSpec",
    "load_vae",
    "looks_like_path",
    "resolve_decoder",
    "store_vae",
    "vae_checksum",
    "vae_spec",
]
