"""Reports: module names → (layer, type), the rank table's content, and the heatmap file."""
from __future__ import annotations

import pytest

from sensitivity_lora.scoring.result import Allocation, ModuleAllocation
from sensitivity_lora.report import layer_index, module_type, plot_ranks, rank_table

LLAMA_TYPES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
BERT_TYPES = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
              "intermediate.dense", "output.dense"]


def make_allocation(ranks: dict[str, int], method: str = "sra", avg_rank: float = 4, budget_mode: str = "rank",
                    r_min: int = 1, r_max: int = 16, d: int = 64) -> Allocation:
    modules = {name: ModuleAllocation(rank=r, theta=float(r), trace=1.0, topk=1.0, eff_rank=1.0, d_in=d, d_out=d,
                                      group=name, at_bound="min" if r <= r_min else ("max" if r >= r_max else None))
               for name, r in ranks.items()}
    budget = sum(ranks.values()) if budget_mode == "rank" else sum(r * 2 * d for r in ranks.values())
    return Allocation(method=method, avg_rank=avg_rank, budget=budget, budget_mode=budget_mode,
                      settings={"r_min": r_min, "rho": 4.0, "r_max": None}, modules=modules)


def _rows(table: str) -> dict[str, list[str]]:
    """First column → the other columns, for every line of the grid part of the table."""
    rows = {}
    for line in table.split("\n\n")[0].splitlines():
        if not line.startswith("-"):
            head, *cells = line.split()
            rows[head] = cells[1:] if head == "Σ" else cells  # "Σ rank" is two words
    return rows


@pytest.mark.parametrize("name, kind, layer", [
    ("model.layers.12.mlp.up_proj", "up_proj", 12),
    ("model.layers.0.self_attn.q_proj", "q_proj", 0),
    ("encoder.layer.3.attention.self.query", "query", 3),
    ("encoder.layer.3.attention.output.dense", "output.dense", 3),
    ("encoder.layer.3.intermediate.dense", "intermediate.dense", 3),
    ("transformer.h.7.attn.c_attn", "c_attn", 7),
    ("blocks.2.dense", "dense", 2),  # never "2.dense": the layer index is not a type
    ("pooler.dense", "pooler.dense", None),
    ("lm_head", "lm_head", None),
    ("net.mlp.0", "mlp.0", 0),
])
def test_module_type_and_layer_index(name, kind, layer):
    assert module_type(name) == kind
    assert layer_index(name) == layer


def test_table_of_a_llama_layout():
    ranks = {f"model.layers.{i}.{t}": 1 + (i * 7 + j) % 16 for i in range(3) for j, t in enumerate(LLAMA_TYPES)}
    allocation = make_allocation(ranks)
    table = rank_table(allocation)
    rows = _rows(table)
    types = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert rows["layer"] == types
    for i in range(3):
        assert rows[str(i)] == [str(ranks[f"model.layers.{i}.{t}"]) for t in LLAMA_TYPES]
    for j, t in enumerate(LLAMA_TYPES):
        values = [ranks[f"model.layers.{i}.{t}"] for i in range(3)]
        assert rows["mean"][j] == f"{sum(values) / 3:.1f}"
        assert rows["Σ"][j] == str(sum(values))
    total = sum(ranks.values())
    assert f"21 modules, method sra, r̄ = 4, Σ rank = {total}, budget = {total} ranks" in table
    conc = allocation.concentration()
    assert (f"the top 5% of modules (1) hold {100 * conc['top5_share']:.1f}% of the ranks; "
            f"modules at r_min = 1: {conc['at_min']}, at r_max (ρ = 4): {conc['at_max']}") in table
    assert conc["at_min"] == 2 and conc["at_max"] == 1  # ranks 1, 1 and 16 occur: the line is not vacuous


def test_bert_types_that_clash_keep_more_of_their_path_and_others_go_last():
    ranks = {f"encoder.layer.{i}.{t}": 2 + i + j for i in range(2) for j, t in enumerate(BERT_TYPES)}
    ranks["pooler.dense"] = 9
    rows = _rows(rank_table(make_allocation(ranks)))
    assert rows["layer"] == ["query", "key", "value", "attention.output.dense", "intermediate.dense",
                             "output.dense", "pooler.dense"]
    assert rows["1"] == ["3", "4", "5", "6", "7", "8", "·"]
    assert rows["other"] == ["·"] * 6 + ["9"]
    assert list(rows)[-3:] == ["other", "mean", "Σ"]


def test_two_stacks_are_told_apart():
    ranks = {f"{stack}.block.{i}.layer.0.SelfAttention.q": 1 + i + 2 * k
             for k, stack in enumerate(("encoder", "decoder")) for i in range(2)}
    rows = _rows(rank_table(make_allocation(ranks)))
    assert [k for k in rows if "block" in k] == ["encoder.block.0", "encoder.block.1", "decoder.block.0",
                                                  "decoder.block.1"]
    assert rows["decoder.block.1"] == ["4"]


def test_params_mode_reports_the_parameter_count():
    ranks = {f"transformer.h.{i}.{t}": 2 + i for i in range(2) for t in ("attn.c_attn", "attn.c_proj", "mlp.c_proj")}
    table = rank_table(make_allocation(ranks, budget_mode="params", d=10))
    params = sum(r * 20 for r in ranks.values())
    assert f"LoRA parameters Σ r·(d_in + d_out) = {params:,} of the budget {params:,}" in table
    assert _rows(table)["layer"] == ["c_attn", "attn.c_proj", "mlp.c_proj"]


def test_empty_allocation_is_an_error(tmp_path):
    empty = Allocation(method="sra", avg_rank=4, budget=0, budget_mode="rank")
    with pytest.raises(ValueError, match="no modules"):
        rank_table(empty)
    with pytest.raises(ValueError, match="no modules"):
        plot_ranks(empty, tmp_path / "x.png")


def _png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_heatmap_of_the_real_size_layout(tmp_path):
    ranks = {f"model.layers.{i}.{t}": 1 + (3 * i + j) % 32 for i in range(30) for j, t in enumerate(LLAMA_TYPES)}
    path = tmp_path / "nested" / "ranks.png"
    plot_ranks(make_allocation(ranks, avg_rank=8, r_max=32), path)
    width, height = _png_size(path)
    assert path.stat().st_size > 20_000 and width > 2 * height  # 30 layers across, 7 types down


def test_heatmap_without_suffix_and_of_a_large_model(tmp_path):
    few = make_allocation({"a.0.q": 1, "a.0.v": 3, "head": 2})
    plot_ranks(few, tmp_path / "plain")
    assert _png_size(tmp_path / "plain")[0] > 0
    many = make_allocation({f"model.layers.{i}.{t}": 1 + i % 8 for i in range(100) for t in LLAMA_TYPES})
    plot_ranks(many, tmp_path / "many.png")  # 700 cells: no annotations, still a picture
    assert (tmp_path / "many.png").stat().st_size > 10_000
