"""vLLM's side of the plugin's equality tests: greedy generation of a tiny checkpoint's images."""
NEW_TOKENS = 8


def vllm_greedy(checkpoint, family, max_model_len: int = 512, max_num_batched_tokens: int = 16, **kwargs):
    """(prompt length, tokens) per image of `family` (the module that built the checkpoint: its
    images() and PROMPT) from vLLM, prefill in chunks of `max_num_batched_tokens` (images span
    several)."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(checkpoint), enforce_eager=True, dtype="float32", max_model_len=max_model_len,
              limit_mm_per_prompt={"image": 1, "video": 0}, enable_chunked_prefill=True,
              max_num_batched_tokens=max_num_batched_tokens, **kwargs)
    outputs = llm.generate([{"prompt": family.PROMPT, "multi_modal_data": {"image": image}}
                            for image in family.images()], SamplingParams(max_tokens=NEW_TOKENS, temperature=0))
    return [(len(o.prompt_token_ids), list(o.outputs[0].token_ids)) for o in outputs]
