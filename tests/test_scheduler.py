"""Scheduling over the paged cache: admission by free blocks, preemption when they run out
(each request still answered exactly as when it runs alone), and blocks returned."""

import pytest

from codellama_jax import load
from codellama_jax.errors import RequestError
from codellama_jax.generation import generate
from codellama_jax.sampling import SamplingParams
from codellama_jax.scheduler import Scheduler

PROMPTS = [[1, 5, 9, 200, 37], [1, *range(40, 60)], [1, 17], [1, 90, 91, 92, 93, 94, 95, 96, 97]]


@pytest.fixture(scope="module")
def model(tiny_gqa_tied):
    return load(tiny_gqa_tied, dtype="float32")


def run(scheduler: Scheduler, requests) -> list[list]:
    """Every request's chunks (all of a request's samples in order), stepping until done."""
    chunks = []
    for prompt, params in requests:
        got = [[] for _ in range(params.n)]
        chunks += got
        scheduler.add(scheduler.sequences(prompt, params, lambda i, got=got: got[i].append))
    while scheduler.has_work():
        scheduler.step()
    return chunks


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
def test_more_work_than_blocks_preempts_and_every_request_is_answered_as_alone(model, sampled):
    """Four requests of up to 49 tokens on a cache of one 64-token sequence: rows run out of
    blocks mid-answer, are preempted and prefilled again with what they had produced; the
    client sees nothing of it, even when the server drains meanwhile."""
    settings = dict(temperature=0.8, top_p=0.9, seed=5, frequency_penalty=0.5) if sampled else dict(temperature=0.0)
    requests = [(p, SamplingParams(max_tokens=40, **settings)) for p in PROMPTS]
    alone = [generate(model, [p], **params.__dict__)[0].token_ids for p, params in requests]
    scheduler = Scheduler(model, max_batch=4, max_len=64, num_blocks=16, block_size=4, steps_per_call=4)
    drained = []
    original_step = scheduler.step

    def step():  # a drain meanwhile fails what waits for a row, not the preempted (mid-answer)
        original_step()
        if scheduler.resuming:
            drained.append(scheduler.stats()["sequences_waiting"])
            scheduler.fail_waiting(RuntimeError("draining"))

    scheduler.step = step
    got = run(scheduler, requests)
    assert scheduler.preemptions > 0 and drained and min(drained) >= 1
    for chunks, want in zip(got, alone):
        assert [t for c in chunks for t in c.token_ids] == want
        assert chunks[-1].finish_reason is not None and chunks[-1].completion_tokens == len(want)
    assert scheduler.pool.num_free == 16 and scheduler.busy_rows == 0


def test_samples_share_their_prompts_full_blocks(model):
    """n = 3 samples of a 10-token prompt hold its two full blocks together and one block each
    of their own; the answers equal the unshared ones."""
    params = SamplingParams(temperature=0.9, seed=3, n=3, max_tokens=6)
    want = [c.token_ids for c in generate(model, [PROMPTS[3] + [7]], **params.__dict__)]
    scheduler = Scheduler(model, max_batch=4, max_len=32, block_size=4, steps_per_call=1)
    held = []
    scheduler.add(scheduler.sequences(PROMPTS[3] + [7], params, lambda i: lambda chunk: None))
    scheduler.step()
    held = [list(seq.blocks) for seq in scheduler.rows if seq is not None]
    assert len({tuple(b[:2]) for b in held}) == 1 and len({b[2] for b in held}) == 3
    while scheduler.has_work():
        scheduler.step()
    assert scheduler.pool.num_free == scheduler.pool.num_blocks
    got = run(scheduler, [(PROMPTS[3] + [7], params)])
    assert [[t for c in chunks for t in c.token_ids] for chunks in got] == want


def test_a_request_the_cache_cannot_hold_is_refused(model):
    scheduler = Scheduler(model, max_batch=8, max_len=32, num_blocks=8, block_size=4)
    with pytest.raises(RequestError, match="KV cache blocks") as e:
        scheduler.sequences(list(range(1, 30)), SamplingParams(n=4, max_tokens=2), lambda i: None)
    assert e.value.param == "n"
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        Scheduler(model, max_batch=2, max_len=64, num_blocks=8, block_size=4)
    with pytest.raises(ValueError, match="unknown decode attention 'pallas'"):
        Scheduler(model, max_batch=2, max_len=64, decode_attention="pallas")


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
def test_a_cached_prefix_is_reused_and_answers_equal_those_without(model, sampled):
    """Prompts sharing a 41-token start, then a second turn (the first turn, its answer and more):
    later prompts prefill only what follows their cached blocks (the answer's blocks included),
    alone and several at once, and answer as with prefix caching off."""
    settings = dict(temperature=0.8, top_p=0.9, seed=11, presence_penalty=0.3) if sampled else dict(temperature=0.0)
    system = [1, *range(100, 140)]
    prompts = [system + [7, 8, 9], system + [30, 31], system + list(range(60, 79))]
    params = SamplingParams(max_tokens=12, **settings)

    def serve(prefix_caching: bool):
        scheduler = Scheduler(model, max_batch=4, max_len=128, block_size=8, prefix_caching=prefix_caching)
        first = run(scheduler, [(prompts[0], params)])[0]
        later = run(scheduler, [(p, params) for p in prompts[1:]])
        answer = [t for c in first for t in c.token_ids]
        turn = run(scheduler, [(prompts[0] + answer + [5, 6], params)])
        answers = [first, *later, *turn]
        return [[t for c in chunks for t in c.token_ids] for chunks in answers], [c[-1].cached_tokens for c in answers], scheduler

    cached, reported, with_cache = serve(True)
    uncached, nothing, _ = serve(False)
    assert cached == uncached
    hits = with_cache.prefix_hit_tokens
    assert hits == 40 + 40 + 48  # 5 blocks of the shared start twice; the second turn 6: one holds answer tokens
    assert reported == [0, 40, 40, 48] and nothing == [0, 0, 0, 0]  # what each request's usage says
    assert with_cache.prefix_queried_tokens == sum(len(p) for p in prompts) + len(prompts[0]) + 12 + 2


def test_cached_blocks_nobody_holds_are_evicted_oldest_first(model):
    """A pool of two 32-token sequences: cached prefixes stay while there is room, and give their
    blocks back, least recently used first, when new prompts need them."""
    scheduler = Scheduler(model, max_batch=2, max_len=32, num_blocks=8, block_size=4)
    params = SamplingParams(temperature=0.0, max_tokens=2)
    a, b, c = ([1, *range(k, k + 20)] for k in (100, 200, 300))
    run(scheduler, [(a, params)])
    run(scheduler, [(b, params)])  # a's 5 full blocks and b's 5: 10 > 8 blocks, so a's oldest go
    assert scheduler.pool.cached_prefix(a + [2]) == [] and len(scheduler.pool.cached_prefix(b + [2])) == 5
    want = generate(model, [c], temperature=0.0, max_tokens=2)[0].token_ids
    assert [t for ch in run(scheduler, [(c, params)])[0] for t in ch.token_ids] == want
    assert scheduler.pool.num_free == 8


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
def test_a_long_prompt_is_prefilled_in_chunks_while_rows_keep_decoding(model, sampled):
    """A 91-token prompt on a scheduler that prefills 32 tokens a step arrives while three rows
    decode: every step still gives each decoding row its tokens, and every answer equals the
    one prefilled whole (in chunks of 32 the prompt takes three steps; n = 2 shares its blocks)."""
    settings = dict(temperature=0.8, top_p=0.9, seed=2, repetition_penalty=1.2) if sampled else dict(temperature=0.0)
    long_prompt = [1, *range(100, 189), 7]
    short = [(p, SamplingParams(max_tokens=30, **settings)) for p in PROMPTS[:3]]
    requests = [*short, (long_prompt, SamplingParams(max_tokens=6, n=2, **settings))]

    def serve(chunk: int):
        scheduler = Scheduler(model, max_batch=8, max_len=128, block_size=8, steps_per_call=2, prefill_chunk=chunk,
                              prefix_caching=False)  # fmt: skip
        got = [[] for _ in range(5)]
        for i, (prompt, params) in enumerate(short):
            scheduler.add(scheduler.sequences(prompt, params, lambda _, i=i: got[i].append))
        scheduler.step()  # the short ones are decoding
        prompt, params = requests[-1]
        scheduler.add(scheduler.sequences(prompt, params, lambda j: got[3 + j].append))
        steps_to_first = 0
        while not got[3]:
            before = [len(chunks) for chunks in got[:3]]
            scheduler.step()
            steps_to_first += 1
            assert all(len(chunks) > n for chunks, n in zip(got[:3], before))  # every step gave them tokens
        while scheduler.has_work():
            scheduler.step()
        return [[t for c in chunks for t in c.token_ids] for chunks in got], steps_to_first

    chunked, steps = serve(32)
    whole, one_step = serve(512)
    assert chunked == whole and (steps, one_step) == (3, 1)


def test_prompts_beyond_a_steps_budget_wait_whole_for_the_next_step(model):
    """Five 120-token prompts, a 512-token budget per step and no chunking (the budget exceeds
    max_len) nor prefix caching, so no shapes for a prompt's later part: four fill the first
    step, the fifth waits for the next one whole, and each answers as alone."""
    prompts = [[1, *range(100 + 10 * i, 219 + 10 * i)] for i in range(5)]
    params = SamplingParams(temperature=0.0, max_tokens=3)
    scheduler = Scheduler(model, max_batch=5, max_len=128, block_size=8, prefill_chunk=512, prefix_caching=False)
    got = run(scheduler, [(p, params) for p in prompts])
    alone = [r.token_ids for r in generate(model, prompts, temperature=0.0, max_tokens=3)]
    assert [[t for c in chunks for t in c.token_ids] for chunks in got] == alone


def test_a_long_prompt_whose_client_left_is_not_prefilled_further(model):
    """Cancelled after its first chunk, a long prompt's other chunks never run: its row and
    blocks are free at the next step, and it ends with a stop."""
    scheduler = Scheduler(model, max_batch=2, max_len=128, block_size=8, prefill_chunk=32, prefix_caching=False)
    got = []
    sequence, = scheduler.sequences([1, *range(100, 190)], SamplingParams(max_tokens=4), lambda _: got.append)
    scheduler.add([sequence])
    scheduler.step()
    assert scheduler.busy_rows == 1 and scheduler.pool.num_free < scheduler.pool.num_blocks
    prefill = scheduler.runner.admit
    scheduler.runner.admit = lambda plan: pytest.fail("a chunk was prefilled for a client that left")
    sequence.cancel()
    scheduler.step()
    scheduler.runner.admit = prefill
    assert not scheduler.has_work() and scheduler.pool.num_free == scheduler.pool.num_blocks
    assert [c.finish_reason for c in got] == ["stop"] and got[0].token_ids == []


def test_a_pool_of_eight_long_slots_runs_32_short_requests_at_once(tmp_path, sp_dir):
    """At max_len 4096, a pool the size of 8 slots of 4096 tokens holds 32 requests of 200
    tokens at once: all 32 run, none waits (what /metrics reports), each answered as alone."""
    from conftest import write_hf_checkpoint

    long_context = load(write_hf_checkpoint(tmp_path / "hf", sp_dir, max_position_embeddings=4096), dtype="float32")
    scheduler = Scheduler(long_context, max_batch=32, max_len=4096, num_blocks=8 * 4096 // 16)
    prompts = [[1, *range(3 + i, 3 + i + 99)] for i in range(32)]
    params = SamplingParams(temperature=0.0, max_tokens=100)
    got = [[] for _ in prompts]
    for chunks, prompt in zip(got, prompts):
        scheduler.add(scheduler.sequences(prompt, params, lambda _, chunks=chunks: chunks.append))
    peak = {}
    while scheduler.has_work():
        scheduler.step()
        stats = scheduler.stats()
        if stats["sequences_running"] > peak.get("sequences_running", 0):
            peak = stats
    assert peak["sequences_running"] == 32 and peak["sequences_waiting"] == 0 and scheduler.preemptions == 0
    assert peak["kv_cache_blocks_used"] <= 32 * 13 + 32  # 200 tokens: 13 blocks each, and the next call's
    for i in (0, 31):
        want = generate(long_context, [prompts[i]], temperature=0.0, max_tokens=100)[0].token_ids
        assert [t for c in got[i] for t in c.token_ids] == want
