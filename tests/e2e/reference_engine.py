"""The single-engine reference for token-equality tests: one plain vLLM engine, no Strata.

Run as a subprocess (vLLM wants a fresh process and a main guard):
    python tests/e2e/reference_engine.py MODEL_DIR < requests.json > results.json
Each request is {"kind": "completion", "prompt": str}, {"kind": "chat", "messages": [...]}
(optional "tools", given to the chat template) or
{"kind": "tokens", "prompt_token_ids": [...]},
plus "max_tokens", optional "ignore_eos" and optional "sampling" (more SamplingParams fields,
e.g. {"repetition_penalty": 1.5}, or {"temperature": 0.9, "seed": 7}; greedy unless it says);
each result is {"token_ids": [...], "text": str}, and "logprobs" when the sampling asks for
them ([logprob, [[top id, its logprob], ...]] per token, the top by rank), and "samples" (each
sample's token ids) for n > 1.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    model_dir = sys.argv[1]
    requests = json.load(sys.stdin)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    from dataplane.hardware import resolve_dtype

    llm = LLM(
        model=model_dir,
        dtype=resolve_dtype("auto"),  # what Strata's workers run (dataplane/hardware.py)
        enforce_eager=True,
        kv_cache_memory_bytes=1 << 30,
        seed=0,
    )
    results = []
    for req in requests:
        fields = {"temperature": 0.0, "max_tokens": req["max_tokens"]}
        fields["ignore_eos"] = req.get("ignore_eos", False)
        sampling = dict(req.get("sampling", {}))
        if "logit_bias" in sampling:  # JSON's keys are strings; vLLM's server makes them ids
            sampling["logit_bias"] = {int(k): v for k, v in sampling["logit_bias"].items()}
        if "structured_outputs" in sampling:
            sampling["structured_outputs"] = StructuredOutputsParams(
                **sampling["structured_outputs"]
            )
        sp = SamplingParams(**(fields | sampling))
        if req["kind"] == "chat":
            out = llm.chat(req["messages"], sp, use_tqdm=False, tools=req.get("tools"))[0]
        elif req["kind"] == "tokens":
            prompt = {"prompt_token_ids": req["prompt_token_ids"]}
            out = llm.generate(prompt, sp, use_tqdm=False)[0]  # type: ignore[arg-type]
        else:
            out = llm.generate(req["prompt"], sp, use_tqdm=False)[0]
        comp = out.outputs[0]
        result = {
            "token_ids": list(comp.token_ids),
            "text": comp.text,
            "prompt_token_ids": list(out.prompt_token_ids or []),
        }
        if sp.n > 1:  # every sample's tokens, in the order of their index
            result["samples"] = [
                list(o.token_ids) for o in sorted(out.outputs, key=lambda o: o.index)
            ]
        if sp.logprobs is not None:
            # Per token: its logprob, and the top sp.logprobs (id, logprob) by rank.
            result["logprobs"] = [
                [
                    step[token_id].logprob,
                    [
                        (t, lp.logprob)
                        for t, lp in sorted(step.items(), key=lambda item: item[1].rank)
                        if lp.rank <= sp.logprobs
                    ],
                ]
                for token_id, step in zip(comp.token_ids, comp.logprobs or [], strict=True)
            ]
        results.append(result)
    sys.stdout.write("\n@@RESULTS@@" + json.dumps(results) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
