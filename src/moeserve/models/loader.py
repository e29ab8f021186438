"""Load a HF-format MoE checkpoint from a local folder and put moeserve's MoE layer in it.

``load_model(path)`` checks the folder first (config, family, every safetensors file's header
and size) so a bad checkpoint gets one :class:`CheckpointError` naming the file and the
problem, then loads through transformers offline and replaces each family MoE block with a
:class:`MoEBlock`. Nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moeserve.config import MoEConfig
from moeserve.errors import CheckpointError, MoeserveError
from moeserve.memory.safetensors_file import checkpoint_weight_files, read_header, read_tensor
from moeserve.models.block import MoEBlock
from moeserve.models.families import FAMILIES, Family
from moeserve.moe.layer import MoELayer
from moeserve.moe.types import ResidentExperts, UnloadedExperts

REFERENCE_MODEL = Path(__file__).resolve().parent.parent / "assets" / "tiny-moe"


@dataclass
class MoEModel:
    """A loaded checkpoint: the transformers model with moeserve MoE blocks, and its tokenizer."""

    path: Path
    family: Family
    hf_model: Any
    """transformers ``*ForCausalLM`` whose MoE blocks are MoEBlocks."""
    tokenizer: Any | None
    moe_config: MoEConfig
    layers: list[MoELayer] = field(default_factory=list)
    """moeserve MoE layers in model order; ``layers[i].layer_index`` is i (MoE-layer index)."""
    decoder_layer_ids: list[int] = field(default_factory=list)
    """Decoder layer number of each MoE layer (DeepSeek's first layers are dense)."""

    @property
    def config(self):
        return self.hf_model.config

    @property
    def num_experts(self) -> int:
        return self.layers[0].experts.num_experts

    @property
    def top_k(self) -> int:
        return self.family.top_k(self.config)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def device(self) -> torch.device:
        """Where the model's weights are (its input embeddings'): inputs must be put there."""
        return self.hf_model.get_input_embeddings().weight.device

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, S, V] for a batch of token ids [B, S] (no cache)."""
        return self.hf_model(input_ids=input_ids.to(self.device), use_cache=False).logits


def resolve_model_path(path: str | Path | None) -> Path:
    """None means the embedded reference model."""
    return REFERENCE_MODEL if path is None else Path(path).expanduser()


def read_config(folder: Path) -> tuple[dict[str, Any], Family]:
    """Parse config.json and find the family adapter; errors name the file and the problem."""
    if not folder.exists():
        raise CheckpointError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder (a model is a folder with config.json and *.safetensors)")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file}: missing; a HF-format model folder needs config.json")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{config_file}: not valid JSON ({error})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in FAMILIES:
        raise CheckpointError(
            f"{config_file}: model_type {model_type!r} is not a supported MoE family; "
            f"supported: {', '.join(FAMILIES.names())}"
        )
    return config, FAMILIES.get(str(model_type))


def check_weight_files(folder: Path) -> list[Path]:
    """Every weight file exists, has a sound header and holds all the bytes its header promises."""
    files = checkpoint_weight_files(folder)
    for path in files:
        read_header(path)
    return files


def _load_transformers_model(folder: Path, dtype: torch.dtype, files: list[Path]) -> Any:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            folder,
            dtype=dtype,
            local_files_only=True,
            output_loading_info=True,
            ignore_mismatched_sizes=True,
        )
    except (OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{folder}: transformers could not load the checkpoint: {error}") from None
    model, info = loaded
    names = ", ".join(p.name for p in files)
    mismatched = info.get("mismatched_keys") or []
    if mismatched:
        details = "; ".join(_describe_mismatch(m) for m in list(mismatched)[:4])
        raise CheckpointError(
            f"{folder}: weights in {names} do not match config.json: {details}"
            + (f" (and {len(mismatched) - 4} more)" if len(mismatched) > 4 else "")
        )
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:4]) + (f" (and {len(missing) - 4} more)" if len(missing) > 4 else "")
        raise CheckpointError(f"{folder}: weights missing from {names} that config.json needs: {shown}")
    model.eval()
    return model


def _load_transformers_model_without_experts(
    folder: Path, dtype: torch.dtype, files: list[Path], family: Family
) -> tuple[Any, dict[int, int]]:
    """The transformers model of ``folder`` with every weight read except the routed experts', and
    the number of routed experts of each MoE decoder layer (by decoder index).

    The model is built without initialising its weights (transformers' ``no_init_weights``: the
    expert tensors are allocated, never written, so they take no memory) and the routed experts'
    parameters are emptied at once; every other checkpoint tensor is renamed to the model's
    names by transformers' own conversion rules for the family and read into its parameter (only
    its bytes, no mapping of the file). Peak memory is the non-expert weights, however large the
    experts. Raises :class:`CheckpointError` for a tensor whose shape differs from the model's,
    a non-expert tensor transformers would have to convert (merge or split), or a weight the
    model needs that no file holds.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        WeightConverter,
        WeightRenaming,
        dot_natural_key,
        rename_source_key,
    )
    from transformers.initialization import no_init_weights

    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        with no_init_weights():
            model: Any = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{folder}: transformers could not build the model: {error}") from None
    model.eval()
    expert_prefixes = []
    shapes: dict[int, tuple[int, int, int]] = {}  # decoder layer -> (E, D, I) the config gives its experts
    for decoder_id, decoder_layer in enumerate(model.model.layers):
        block = decoder_layer.mlp
        if type(block).__name__ != family.block_class:
            continue
        expert_prefixes.append(f"model.layers.{decoder_id}.mlp.experts.")
        experts, two_i, hidden = block.experts.gate_up_proj.shape  # [E, 2I, D]
        shapes[decoder_id] = (int(experts), int(hidden), int(two_i) // 2)
        for parameter in block.experts.parameters(recurse=False):
            parameter.data = parameter.data.new_empty((0, *parameter.shape[1:]))
    prefixes = tuple(expert_prefixes)
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    expected = model.state_dict()
    loaded: set[int] = set()  # data pointers of the tensors read (tied weights share one)
    headers = [read_header(path) for path in files]
    # In transformers' order (some renaming rules are stateful): every file's keys, naturally sorted.
    entries = sorted(((key, header) for header in headers for key in header.tensors), key=lambda e: dot_natural_key(e[0]))
    for key, header in entries:
        path = header.path
        renamed, converted_by = rename_source_key(key, renamings, converters, model.base_model_prefix, expected)
        if renamed not in expected and key in expected:
            renamed, converted_by = key, None
        if renamed.startswith(prefixes):
            continue  # a routed expert: read by the expert cache when it is needed
        if renamed not in expected:
            continue  # as transformers does, a tensor the model has no place for is left unread
        if converted_by is not None:
            raise CheckpointError(
                f"{path}: {key} needs transformers to convert it ({converted_by}), which loading without "
                "the experts does not do; load the model with its experts"
            )
        target = model.get_parameter_or_buffer(renamed)
        tensor = read_tensor(header, key)
        if tuple(tensor.shape) != tuple(target.shape):
            raise CheckpointError(
                f"{folder}: weights in {path.name} do not match config.json: {key} is "
                f"{tuple(tensor.shape)} in the file, config expects {tuple(target.shape)}"
            )
        with torch.no_grad():
            target.copy_(tensor)
        loaded.add(target.data_ptr())
    _check_unloaded_experts(folder, shapes)
    missing = sorted(
        name for name, tensor in expected.items()
        if not name.startswith(prefixes) and tensor.numel() and tensor.data_ptr() not in loaded
    )  # fmt: skip
    if missing:
        shown = ", ".join(missing[:4]) + (f" (and {len(missing) - 4} more)" if len(missing) > 4 else "")
        names = ", ".join(p.name for p in files)
        raise CheckpointError(f"{folder}: weights missing from {names} that config.json needs: {shown}")
    return model, {decoder_id: shape[0] for decoder_id, shape in shapes.items()}


def _check_unloaded_experts(folder: Path, shapes: dict[int, tuple[int, int, int]]) -> None:
    """The experts the checkpoint holds (index only, nothing read) have the (E, D, I) ``shapes`` the
    config gives each MoE decoder layer."""
    from moeserve.memory.store import ExpertStore

    store = ExpertStore(folder)
    for decoder_id, expected in shapes.items():
        try:
            spec = store.layer_spec(decoder_id)
        except KeyError:
            raise CheckpointError(f"{folder}: the checkpoint has no routed experts for decoder layer {decoder_id}") from None
        found = (spec.num_experts, spec.hidden_size, spec.intermediate_size)
        if found != expected:
            raise CheckpointError(
                f"{folder}: weights do not match config.json: decoder layer {decoder_id} has experts (E, D, I) = "
                f"{found} in the files, config expects {expected}"
            )


def _describe_mismatch(entry) -> str:
    if isinstance(entry, tuple | list) and len(entry) == 3:
        key, checkpoint_shape, model_shape = entry
        return f"{key} is {tuple(checkpoint_shape)} in the file, config expects {tuple(model_shape)}"
    return str(entry)


def install_moe_layers(model: Any, family: Family, moe_config: MoEConfig,
                       unloaded: dict[int, int] | None = None) -> tuple[list[MoELayer], list[int]]:
    """Replace every family MoE block with a MoEBlock; return the MoE layers and their decoder indices.

    ``unloaded`` (decoder layer -> number of experts) names layers whose experts were not read:
    they get :class:`UnloadedExperts` until an expert cache takes them over.
    """
    layers: list[MoELayer] = []
    decoder_ids: list[int] = []
    decoder_layers = model.model.layers
    for decoder_id, decoder_layer in enumerate(decoder_layers):
        block = decoder_layer.mlp
        if type(block).__name__ != family.block_class:
            continue
        experts = block.experts
        provider: ResidentExperts | UnloadedExperts
        if unloaded is not None and decoder_id in unloaded:
            provider = UnloadedExperts(unloaded[decoder_id], experts.gate_up_proj.dtype, experts.gate_up_proj.device)
        else:
            provider = ResidentExperts(gate_up_proj=experts.gate_up_proj.data, down_proj=experts.down_proj.data)
        layer = MoELayer(provider, experts.act_fn, moe_config, layer_index=len(layers))
        decoder_layer.mlp = MoEBlock(block, family, layer)
        layers.append(layer)
        decoder_ids.append(decoder_id)
    if not layers:
        raise CheckpointError(f"no {family.block_class} blocks found in the {family.model_type} model")
    return layers, decoder_ids


def own_checkpoint_weights(model: torch.nn.Module, layers: list[MoELayer]) -> int:
    """Copy every parameter and buffer of ``model`` except the routed experts into memory it owns.

    transformers loads a safetensors file through one private memory mapping of the whole file,
    and tensors it does not convert (attention, norms, embeddings, routers) stay views into that
    mapping, which keeps the whole file mapped for the life of the model: every page read while
    loading (the experts' too, which the family converters copy into stacked tensors) then counts
    in the process's resident memory, and the kernel cannot drop the file's pages from its cache,
    so an expert cache's loads never reach the storage device. After this copy nothing refers to
    the mapping and it is released. Parameters keep their identity (tied weights stay tied); the
    routed experts (``layers``' resident tensors) are left as they are: they are either copies
    already or, if the checkpoint stores them in the model's layout, released by an expert cache.
    Returns the number of bytes copied.
    """
    skip = {
        tensor.untyped_storage().data_ptr()
        for layer in layers
        for tensor in (getattr(layer.experts, "gate_up_proj", None), getattr(layer.experts, "down_proj", None))
        if isinstance(tensor, torch.Tensor)
    }
    copied = 0
    done: set[int] = set()  # parameters copied in place (a tied parameter is one object)
    buffer_copies: dict[int, torch.Tensor] = {}  # a buffer shared by modules gets one copy
    for module in model.modules():
        for parameter in module._parameters.values():
            if parameter is None or id(parameter) in done or parameter.untyped_storage().data_ptr() in skip:
                continue
            done.add(id(parameter))
            parameter.data = parameter.data.clone()
            copied += parameter.numel() * parameter.element_size()
        for name, buffer in list(module._buffers.items()):
            if buffer is None or buffer.untyped_storage().data_ptr() in skip:
                continue
            if id(buffer) not in buffer_copies:
                buffer_copies[id(buffer)] = buffer.clone()
                copied += buffer.numel() * buffer.element_size()
            module._buffers[name] = buffer_copies[id(buffer)]
    return copied


def load_model(
    path: str | Path | None = None,
    *,
    moe: MoEConfig | None = None,
    dtype: torch.dtype = torch.float32,
    load_tokenizer: bool = True,
    load_experts: bool = True,
    device: torch.device | str = "cpu",
) -> MoEModel:
    """Load the HF-format MoE checkpoint in ``path`` (None: the reference model) for moeserve.

    ``load_experts=False`` reads everything but the routed experts (see
    :func:`_load_transformers_model_without_experts`): for a model whose experts do not fit in
    memory, to be served through an expert cache, which must be applied before the model runs
    (:func:`moeserve.memory.offload.apply_expert_cache`; until then its MoE layers raise).

    ``device`` (``cpu``, ``cuda``, ``cuda:1``; see :func:`resolve_device`): the weights are read
    on the CPU, then moved there; without the experts, their empty placeholders move too, so an
    expert cache applied afterwards puts its slots there.

    Raises CheckpointError for an unsupported family, a folder without weights, a truncated
    or corrupt safetensors file, or weights that do not match config.json; MoeserveError (before
    reading anything) for a device this machine does not have.
    """
    target = resolve_device(device)
    folder = resolve_model_path(path)
    _, family = read_config(folder)
    files = check_weight_files(folder)
    moe_config = moe or MoEConfig()
    unloaded = None
    if load_experts:
        hf_model = _load_transformers_model(folder, dtype, files)
    else:
        hf_model, unloaded = _load_transformers_model_without_experts(folder, dtype, files, family)
    layers, decoder_ids = install_moe_layers(hf_model, family, moe_config, unloaded)
    if load_experts:  # the other path reads every tensor into memory of its own already
        own_checkpoint_weights(hf_model, layers)
    if target.type != "cpu":
        _move_to_device(hf_model, layers, decoder_ids, target)
    tokenizer = _load_tokenizer(folder) if load_tokenizer else None
    return MoEModel(
        path=folder,
        family=family,
        hf_model=hf_model,
        tokenizer=tokenizer,
        moe_config=moe_config,
        layers=layers,
        decoder_layer_ids=decoder_ids,
    )


def resolve_device(device: torch.device | str) -> torch.device:
    """``device`` checked against this machine: ``cpu``, or ``cuda[:N]`` when torch sees that GPU
    (``cuda`` becomes the current CUDA device). MoeserveError, naming why, for anything else."""
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise MoeserveError(f"device must be cpu or cuda (cuda:N), got {device!r}") from None
    if resolved.type == "cpu":
        return resolved
    if resolved.type != "cuda":
        raise MoeserveError(f"device must be cpu or cuda (cuda:N), got {device!r}")
    if not torch.cuda.is_available():
        build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise MoeserveError(
            f"device {str(device)!r}: torch sees no CUDA device on this machine (torch {torch.__version__}, {build}); "
            "use --device cpu"
        )
    count = torch.cuda.device_count()
    if resolved.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    if resolved.index >= count:
        raise MoeserveError(f"device {str(device)!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return resolved


def _move_to_device(hf_model: Any, layers: list[MoELayer], decoder_ids: list[int], device: torch.device) -> None:
    """Move every weight to ``device`` and point each MoE layer at its moved experts (re-choosing its backend)."""
    hf_model.to(device)  # parameters keep their identity; their data moves
    for layer, decoder_id in zip(layers, decoder_ids, strict=True):
        experts = layer.experts
        if isinstance(experts, UnloadedExperts):
            layer.replace_experts(UnloadedExperts(experts.count, experts.weight_dtype, device))
            continue
        moved = hf_model.model.layers[decoder_id].mlp.experts
        layer.replace_experts(ResidentExperts(gate_up_proj=moved.gate_up_proj.data, down_proj=moved.down_proj.data))


def _load_tokenizer(folder: Path):
    if not ((folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{folder}: tokenizer files could not be loaded: {error}") from None
