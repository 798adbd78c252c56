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
    client sees nothing of it."""
    settings = dict(temperature=0.8, top_p=0.9, seed=5, frequency_penalty=0.5) if sampled else dict(temperature=0.0)
    requests = [(p, SamplingParams(max_tokens=40, **settings)) for p in PROMPTS]
    alone = [generate(model, [p], **params.__dict__)[0].token_ids for p, params in requests]
    scheduler = Scheduler(model, max_batch=4, max_len=64, num_blocks=16, block_size=4, steps_per_call=4)
    got = run(scheduler, requests)
    assert scheduler.preemptions > 0
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
