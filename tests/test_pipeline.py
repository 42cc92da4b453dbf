"""`enable(pipe, device_budget=...)` on a tiny diffusers WanPipeline built in code (random weights, a
word-level tokenizer, no download): outputs bit-identical to the pipeline without offload, the text
encoder streamed, the transformers planned under the budget, and disable or a refusal leaving every
component as it was."""

import copy

import pytest
import torch

import fastvideo_offload as fo
from support.needs import integration
from fastvideo_offload.planner import plan
from support.offloaded import packed_bytes
from support.snapshot import assert_unchanged, hook_count, snapshot

diffusers = integration("diffusers")
accelerate = integration("accelerate")  # the diffusers example builds its transformers on meta with it
transformers = integration("transformers")
tokenizers = integration("tokenizers")

WORDS = ["<pad>", "</s>", "<unk>", "a", "cat", "on", "the", "moon", "dog"]
BLOCK_LISTS = {"text_encoder": "encoder.block", "transformer": "blocks", "transformer_2": "blocks"}


def tiny_pipeline(experts: int):
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tok = tokenizers.Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                     unk_token="<unk>")
    text_encoder = transformers.UMT5EncoderModel(transformers.UMT5Config(
        vocab_size=len(WORDS), d_model=32, d_kv=8, d_ff=32, num_layers=3, num_heads=4,
        relative_attention_num_buckets=8,
    )).eval()

    def transformer():
        return diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
            text_dim=32, freq_dim=16, ffn_dim=64, num_layers=6, rope_max_seq_len=32,
        ).eval()

    vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1,
                                     temperal_downsample=[False], latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()
    return diffusers.WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=transformer(),
        transformer_2=transformer() if experts == 2 else None, boundary_ratio=0.5 if experts == 2 else None,
    )


def generate(pipe):
    # 3 steps: with boundary_ratio 0.5, Wan2.2's two experts both run.
    return pipe(prompt="a cat on the moon", negative_prompt="a dog", height=16, width=16, num_frames=5,
                num_inference_steps=3, guidance_scale=4.0, max_sequence_length=8, output_type="pt",
                generator=torch.Generator().manual_seed(1)).frames


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


def layout(pipe):
    """What stays on the device for good (the VAE whole, the others' weights outside their blocks)
    and each offloaded component's block sizes, counted here independently of pipeline.py."""
    held = nbytes([*pipe.vae.parameters(), *pipe.vae.buffers()])
    sizes = {}
    for name, path in BLOCK_LISTS.items():
        component = getattr(pipe, name)
        if component is None:
            continue
        blocks = component.get_submodule(path)
        inside = {id(p) for p in blocks.parameters()}
        held += nbytes([p for p in component.parameters() if id(p) not in inside] + list(component.buffers()))
        sizes[name] = [packed_bytes(list(b.parameters())) for b in blocks]
    return held, sizes


def components(pipe):
    return {name: m for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)}


@pytest.mark.parametrize("experts", [1, 2], ids=["wan21", "wan22"])
def test_pipeline_enable_is_bit_identical_within_the_budget(experts):
    pipe = tiny_pipeline(experts)
    reference = copy.deepcopy(pipe)
    expected = generate(reference)
    held, sizes = layout(pipe)
    block = sizes["transformer"][0]
    # Room for the transformers' ring of 2 slots and 2 resident blocks; the text encoder's ring fits too.
    budget = held + 4 * block
    assert 2 * max(sizes["text_encoder"]) <= 4 * block
    transformer_plan = plan(sizes["transformer"], 4 * block, 2)
    assert len(transformer_plan.resident) == 2 and len(transformer_plan.streamed) == 4

    handle = fo.enable(pipe, device="cpu", device_budget=budget)
    assert fo.handle_of(pipe) is handle
    planned = ["transformer", "transformer_2"][:experts]
    assert handle.placement == {"vae": "moved", "text_encoder": "streamed", **{n: "planned" for n in planned}}
    assert pipe._execution_device == torch.device("cpu") and pipe.device == torch.device("cpu")

    # The bound, checked from inside every offloaded block's forward: what stays plus every slot.
    peaks = []

    def check(module, args):
        device_bytes = held + sum(s.get("device_bytes", 0) for n, s in handle.stats().items() if n != "vae")
        peaks.append(device_bytes)
        assert device_bytes <= budget

    probes = [b.register_forward_pre_hook(check) for name, path in BLOCK_LISTS.items() if getattr(pipe, name)
              is not None for b in getattr(pipe, name).get_submodule(path)]
    for _ in range(2):
        assert torch.equal(generate(pipe), expected)
    for probe in probes:
        probe.remove()
    assert peaks

    stats = handle.stats()
    assert stats["text_encoder"]["resident_blocks"] == 0 and stats["text_encoder"]["streamed_blocks"] == 3
    # Prompt and negative prompt, two generations: each block copied at each of the 4 forwards.
    assert stats["text_encoder"]["enters"] == 4 * 3 and stats["text_encoder"]["uploads"] >= 4 * 3
    for name in planned:
        assert stats[name]["resident_blocks"] == len(transformer_plan.resident)
        assert stats[name]["streamed_blocks"] == len(transformer_plan.streamed)
    assert stats["vae"] == {"device_bytes": nbytes([*pipe.vae.parameters(), *pipe.vae.buffers()])}

    handle.disable()
    assert fo.handle_of(pipe) is None
    for name, component in components(pipe).items():
        twin = getattr(reference, name)
        assert hook_count(component) == hook_count(twin), name
        for (key, got), want in zip(component.state_dict().items(), twin.state_dict().values()):
            assert got.device == want.device and torch.equal(got, want), f"{name}.{key}"
    assert torch.equal(generate(pipe), expected)


def test_disable_through_the_module_function_and_twice():
    pipe = tiny_pipeline(1)
    fo.enable(pipe, device="cpu")
    with pytest.raises(RuntimeError, match="offload is already enabled on this WanPipeline"):
        fo.enable(pipe, device="cpu")
    fo.disable(pipe)
    with pytest.raises(RuntimeError, match="offload is not enabled on this WanPipeline"):
        fo.disable(pipe)
    assert all(fo.handle_of(m) is None for m in components(pipe).values())


@pytest.mark.parametrize("room, message", [
    (-1, r"device_budget: \d+ bytes less the \d+ that stay on the device \(vae \d+, text_encoder \d+, transformer "
         r"\d+\) leave -1; raise the budget"),
    (0, r"leave 0, less than streaming text_encoder needs: 2 slot\(s\) of its largest block"),
    ("te ring", r"for the blocks of transformer: device_budget: \d+ bytes for the blocks is less than streaming "
                r"needs"),
])
def test_a_budget_too_small_is_refused_and_changes_nothing(room, message):
    pipe = tiny_pipeline(1)
    held, sizes = layout(pipe)
    if room == "te ring":
        room = 2 * max(sizes["text_encoder"])
        assert 2 * max(sizes["transformer"]) > room
    before = {name: snapshot(m) for name, m in components(pipe).items()}
    with pytest.raises(ValueError, match=message):
        fo.enable(pipe, device="cpu", device_budget=held + room)
    assert fo.handle_of(pipe) is None
    for name, component in components(pipe).items():
        assert_unchanged(component, before[name])


def test_a_component_that_fails_midway_undoes_the_ones_already_enabled():
    pipe = tiny_pipeline(2)
    # transformer_2 is enabled last, after the text encoder and transformer already are.
    pipe.transformer_2.blocks[0].ffn.net[0].proj.weight = torch.nn.Parameter(torch.empty(64, 32, device="meta"))
    before = {name: snapshot(m) for name, m in components(pipe).items() if name != "transformer_2"}
    with pytest.raises(ValueError, match="are on the meta device"):
        fo.enable(pipe, device="cpu")
    assert fo.handle_of(pipe) is None
    for name, snap in before.items():
        # Their block weights were copied back out of the host store: same values, another address.
        assert_unchanged(getattr(pipe, name), snap, moved=[BLOCK_LISTS.get(name, "-") + "."])


def test_pipeline_arguments_are_refused_with_what_to_do():
    pipe = tiny_pipeline(1)
    with pytest.raises(ValueError, match="blocks= and group= are chosen per component for a pipeline"):
        fo.enable(pipe, device="cpu", group="g")
    with pytest.raises(ValueError, match="device_budget must be a byte count"):
        fo.enable(pipe, device="cpu", device_budget=-5)
    for extra in (dict(checkpoint="model.safetensors"), dict(share="node")):
        with pytest.raises(ValueError, match="apply to a model: a pipeline's components"):
            fo.enable(pipe, device="cpu", **extra)
    fo.enable(pipe.transformer, device="cpu")
    with pytest.raises(RuntimeError, match="already enabled on its transformer"):
        fo.enable(pipe, device="cpu")
    assert fo.handle_of(pipe) is None


def _example():
    """examples/diffusers_wan.py, imported as a module (it is a script, not part of the package)."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "diffusers_wan.py")
    spec = importlib.util.spec_from_file_location("diffusers_wan_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("experts, dtype", [(1, torch.float32), (2, torch.float32), (2, torch.bfloat16)])
def test_the_diffusers_example_offloads_the_transformers_from_their_checkpoints(tmp_path, experts, dtype):
    """The example's load_pipeline on a pipeline saved by save_pretrained: each transformer built on
    meta and offloaded from its own files, 2 blocks pinned, 4 staged (in fp32 left in the files' pages); the video is
    bit-identical to from_pretrained's pipeline in that dtype (bf16: the class's fp32 modules kept)."""
    tiny_pipeline(experts).save_pretrained(tmp_path)
    pipe = diffusers.WanPipeline.from_pretrained(tmp_path, dtype=dtype)
    with torch.no_grad():
        for name in ["transformer", "transformer_2"][:experts]:
            for p in getattr(pipe, name).parameters():
                # from_pretrained leaves weights at the file's alignments, where a CPU kernel may
                # round otherwise; the offloaded ones sit aligned, as a copy does.
                p.data = p.data.clone()
    expected = generate(pipe)
    block = packed_bytes(list(pipe.transformer.blocks[0].parameters()))
    loaded = _example().load_pipeline(str(tmp_path), "cpu", dtype, host_pin_budget=2 * block)
    names = ["transformer", "transformer_2"][:experts]
    for name in names:
        stats = fo.handle_of(getattr(loaded, name)).stats()
        # The tiny pipeline is saved in fp32: bf16 blocks need a cast, so they are read, not mapped.
        assert (stats["staged_blocks"], stats["mapped_bytes"]) == (4, 4 * block if dtype == torch.float32 else 0)
    assert torch.equal(generate(loaded), expected)
    for name in names:
        fo.disable(getattr(loaded, name))
