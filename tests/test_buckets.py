"""The compile policy's sizes (warm-up covering them is tested in test_generation.py)."""

from codellama_jax import buckets


def test_prompt_lengths_pad_to_powers_of_two_and_three_quarters_of_one():
    padded = {n: buckets.prompt_bucket(n, 1000) for n in (1, 16, 17, 24, 25, 40, 48, 49, 97, 700, 769, 1000)}
    assert padded == {1: 16, 16: 16, 17: 24, 24: 24, 25: 32, 40: 48, 48: 48, 49: 64, 97: 128, 700: 768,
                      769: 1000, 1000: 1000}  # fmt: skip


def test_prefill_shapes_cover_every_prompt_length_within_the_token_budget():
    shapes = buckets.prefill_shapes(max_batch=8, max_len=1000, cached_blocks=63)
    for n in range(1, 1001):
        assert (1, buckets.prompt_bucket(n, 1000), 0) in shapes
        assert (1, buckets.prompt_bucket(n, 1000), 63) in shapes  # the rest of a prompt after its cached prefix
    assert all(P * T <= 1000 or P == 1 for P, T, _ in shapes) and len(set(shapes)) == len(shapes)
    assert max(P for P, _, _ in shapes) == 8 and {J for P, _, J in shapes if P > 1} == {0}
