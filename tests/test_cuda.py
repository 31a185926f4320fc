"""The CUDA path: the compiled Triton decode kernel, decode steps replayed from CUDA graphs (greedy output equal to
transformers', with padding rows), the HF baseline and the roofline measurements on the GPU. Skipped without CUDA.

The other engine tests also run on CUDA when it is there (their engines pick the device automatically), so the
whole suite on a GPU machine checks this path against transformers in every scheduling scenario."""
from __future__ import annotations

import pytest
import torch

from tokenmill import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

NEW_TOKENS = 12
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)


def _prompts(vocab: int, lengths: list[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(10, vocab, (n,), generator=g).tolist() for n in lengths]


def test_triton_kernel_compiled_matches_reference():
    pytest.importorskip("triton")
    from test_triton_kernels import check_elementwise, check_kernel

    check_kernel("cuda", [torch.bfloat16, torch.float16, torch.float32])
    check_elementwise("cuda", [torch.bfloat16, torch.float16, torch.float32])


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_graph_replay_greedy_matches_transformers(tiny_model_factory, arch):
    from transformers import AutoModelForCausalLM

    from test_equivalence import hf_greedy

    path = tiny_model_factory(arch)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    # 3 and 5 sequences run in graphs of 4 and 8 rows: padding rows share the step with real ones.
    for lengths in ([3, 17, 9], [5, 30, 1, 24, 11]):
        prompts = _prompts(ref.config.vocab_size, lengths)
        llm = LLM(path, dtype="float32", device="cuda")
        graphs = llm.engine.runner.graphs
        assert graphs is not None, "decode graphs were not captured"
        outs = llm.generate(prompts, GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == hf_greedy(ref, prompts)
        assert graphs.num_replays >= NEW_TOKENS - 1
        assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
        del llm


def test_enforce_eager_and_bf16(tiny_model_factory):
    path = tiny_model_factory("llama")
    prompts = _prompts(256, [4, 40, 7])
    eager = LLM(path, dtype="float32", device="cuda", enforce_eager=True)
    assert eager.engine.runner.graphs is None
    graphed = LLM(path, dtype="float32", device="cuda")
    assert [o.outputs[0].token_ids for o in eager.generate(prompts, GREEDY, use_tqdm=False)] == \
        [o.outputs[0].token_ids for o in graphed.generate(prompts, GREEDY, use_tqdm=False)]
    bf16 = LLM(path, dtype="bfloat16", device="cuda")
    assert bf16.engine.runner.graphs is not None
    outs = bf16.generate(prompts, GREEDY, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == NEW_TOKENS for o in outs)


def test_hf_baseline_and_roofline_on_cuda(tiny_model_factory):
    from transformers import AutoModelForCausalLM

    from tokenmill.bench import hf_baseline, machine

    model = AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama"), dtype=torch.bfloat16).cuda().eval()
    res = hf_baseline.run_static_batches(model, _prompts(256, [3, 9, 5]), batch_size=2, max_new_tokens=[4, 6, 5])
    assert [len(o) for o in res.outputs] == [4, 6, 5] and res.num_batches == 2
    bw = machine.measure_bandwidth(256, 3, device="cuda")
    mm = machine.measure_matmul(2048, 3, ["bfloat16"], device="cuda")
    assert bw["copy_gb_s"] > 100 and mm["bfloat16_gflop_s"] > 1000
