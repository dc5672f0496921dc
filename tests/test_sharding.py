"""mdtrt.sharding alone: reading ShardHints (dict, JSON text, file), refusing bad hints with the
field and what it means before polygraphy runs, and the per-layer check after sharding that a
hinted attention layer got the collectives its strategy needs."""

from __future__ import annotations

import json

import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnx_graphsurgeon")
pytest.importorskip("polygraphy")

import mdtrt  # noqa: E402
from mdtrt import attention, sharding, simulate  # noqa: E402
from mdtrt.errors import InvalidArgumentError  # noqa: E402
from test_context_parallel import HEADS, STRATEGIES, model_and_reference  # noqa: E402


class TestLoadHints:
    def test_dict_is_copied(self):
        hints = attention.default_hints(2)
        loaded = sharding.load_hints(hints)
        assert loaded == hints and loaded is not hints
        loaded["attention_layers"][0]["q"] = "changed"
        assert hints["attention_layers"][0]["q"] != "changed"  # a deep copy: the caller's dict is untouched

    def test_json_text_and_file_give_the_same_hints(self, tmp_path):
        hints = attention.default_hints(3)
        path = tmp_path / "hints.json"
        path.write_text(json.dumps(hints))
        assert sharding.load_hints(json.dumps(hints)) == hints
        assert sharding.load_hints(str(path)) == hints
        assert sharding.load_hints(path) == hints

    def test_json_that_is_not_an_object(self, tmp_path):
        path = tmp_path / "list.json"
        path.write_text("[1, 2]")
        with pytest.raises(InvalidArgumentError, match="must hold a JSON object"):
            sharding.load_hints(str(path))

    @pytest.mark.parametrize("value", [3, None, [attention.default_hints(2)]])
    def test_other_types(self, value):
        with pytest.raises(InvalidArgumentError, match="hints must be a dict, a JSON file path or JSON text"):
            sharding.load_hints(value)


class TestBadHints:
    def setup_method(self):
        self.model, self.hints, self.inputs, _ = model_and_reference("mdtrt", "float32")

    @pytest.mark.parametrize("strategy", STRATEGIES)
    def test_q_that_is_not_the_query(self, strategy):
        hints = self.hints(2)
        hints["attention_layers"][0]["q"] = "k_transposed"  # exists, but is the attention's K
        with pytest.raises(InvalidArgumentError, match="q='k_transposed' is not the query.*MatMul"):
            mdtrt.shard(self.model, hints, 2, strategy=strategy)

    def test_allgather_kv_without_gather_kv(self):
        hints = self.hints(2)
        hints["attention_layers"][0]["gather_kv"] = False
        with pytest.raises(InvalidArgumentError, match="gather_kv false"):
            mdtrt.shard(self.model, hints, 2, strategy="allgather_kv")

    def test_ulysses_heads_not_divisible(self):
        with pytest.raises(InvalidArgumentError, match=f"{HEADS} heads.*4 ranks"):
            mdtrt.shard(self.model, self.hints(4), 4, strategy="ulysses")

    def test_ring_with_gather_q(self):
        hints = self.hints(2)
        hints["attention_layers"][0]["gather_q"] = True
        with pytest.raises(InvalidArgumentError, match="gather_q true"):
            mdtrt.shard(self.model, hints, 2, strategy="ring")

    @pytest.mark.parametrize("strategy", STRATEGIES)
    def test_wrong_sequence_axis_of_the_input_fails_the_check(self, strategy):
        hints = self.hints(2)
        hints["inputs"][0]["seq_len_idx"] = 1  # the batch axis
        expected = mdtrt.run_on_cpu(self.model, self.inputs, progress=False)
        try:
            outputs = simulate(mdtrt.shard(self.model, hints, 2, strategy=strategy), self.inputs, 2,
                                     progress=False)[0]
        except InvalidArgumentError as error:
            # Refused instead of run: also visible, if the refusal names the hint. Any other error
            # (a crash of shard or simulate) fails the test rather than passing it.
            assert "seq_len_idx" in str(error), error
            return
        assert not mdtrt.compare_outputs(expected, outputs, atol=1e-4, rtol=1e-4).passed

    def test_fields_are_explained(self):
        hints = self.hints(2)
        del hints["k_seq_len_idx"]
        with pytest.raises(InvalidArgumentError, match="'k_seq_len_idx' is missing; it must be the sequence axis of K"):
            mdtrt.shard(self.model, hints, 2)
        hints = self.hints(2)
        hints["v_seq_len_idx"] = 7
        with pytest.raises(InvalidArgumentError, match="v_seq_len_idx.*not an axis"):
            mdtrt.shard(self.model, hints, 2)

    @pytest.mark.parametrize("where", ["top", "attention_layers", "dist_collectives", "inputs", "outputs"])
    def test_unknown_fields_are_refused_naming_the_known_ones(self, where, monkeypatch):
        # polygraphy ignores what it does not know: a misspelt field would silently keep its default.
        monkeypatch.setattr(sharding, "_run_polygraphy", lambda *args: pytest.fail("reached polygraphy"))
        hints = self.hints(2)
        entry = {"top": hints, "attention_layers": hints["attention_layers"][0],
                 "dist_collectives": hints["dist_collectives"], "inputs": hints["inputs"][0],
                 "outputs": hints["outputs"][0]}[where]
        entry["stratgey"] = "ring"
        known = [f for f in sharding.KNOWN_FIELDS["hints" if where == "top" else where] if f != "polygraphy_class"]
        with pytest.raises(InvalidArgumentError, match="unknown field 'stratgey'; the known ones are " + ", ".join(known)):
            mdtrt.shard(self.model, hints, 2)

    def test_a_hints_file_must_say_its_rank_count(self, tmp_path):
        hints = self.hints(2)
        assert sharding.declared_ranks(hints) == 2
        del hints["dist_collectives"]["nb_rank"]
        with pytest.raises(InvalidArgumentError, match="have no dist_collectives.nb_rank: set it to the number of ranks"):
            sharding.declared_ranks(hints)
        hints["dist_collectives"]["nb_rank"] = 0
        with pytest.raises(InvalidArgumentError, match="nb_rank 0, not a positive integer"):
            sharding.declared_ranks(hints)

    @pytest.mark.parametrize("nb_rank", [0, -3, 2.5])
    def test_hints_for_no_ranks_are_refused_whatever_ranks_are_asked_for(self, nb_rank, monkeypatch):
        """Hints with nb_rank 0 are refused as such, not with "set nb_rank to 2 in the hints, or
        shard for 0 ranks"."""
        monkeypatch.setattr(sharding, "_run_polygraphy", lambda *args: pytest.fail("reached polygraphy"))
        hints = self.hints(2)
        hints["dist_collectives"]["nb_rank"] = nb_rank
        expected = f"hints field 'dist_collectives' has nb_rank {nb_rank!r}, not a positive integer"
        for call in (lambda: mdtrt.shard(self.model, hints, 2), lambda: mdtrt.shard(self.model, hints),
                     lambda: sharding.check_hints(hints)):
            with pytest.raises(InvalidArgumentError, match=f"^{expected}") as error:
                call()
            assert "for 0 ranks" not in str(error.value)

    def test_a_directory_is_not_a_hints_file(self, tmp_path):
        with pytest.raises(InvalidArgumentError, match=f"hints: file {tmp_path} is a directory: give a ShardHints JSON file"):
            sharding.load_hints(tmp_path)

    @pytest.mark.parametrize("reduce_op", ["sum", "maximum", "avg"])
    def test_reduce_op_refused_up_front(self, reduce_op):
        hints = self.hints(2)
        hints["dist_collectives"]["reduce_op"] = reduce_op
        with pytest.raises(InvalidArgumentError, match="reduce_op.*only \"max\" or \"min\""):
            mdtrt.shard(self.model, hints, 2)

    def test_polygraphy_failure_is_reported_once(self, capfd):
        hints = self.hints(2)
        hints["inputs"][0]["polygraphy_class"] = "NotAClass"
        with pytest.raises(InvalidArgumentError, match="polygraphy multi-device shard failed: .*NotAClass") as caught:
            mdtrt.shard(self.model, hints, 2)
        out, err = capfd.readouterr()
        assert "NotAClass" not in out + err and str(caught.value).count("NotAClass") == 1

    def test_minimal_hints(self):
        # No dist_collectives and no polygraphy_class fields: mdtrt fills in polygraphy's defaults.
        hints = {"attention_layers": [{"q": "q_scaled", "gather_kv": True}], "k_seq_len_idx": 3, "v_seq_len_idx": 2,
                 "kv_rank": 4, "inputs": [{"name": "input", "seq_len_idx": 0}],
                 "outputs": [{"name": "output", "seq_len_idx": 0}]}
        expected = mdtrt.run_on_cpu(self.model, self.inputs, progress=False)
        for strategy in STRATEGIES:
            outputs = simulate(mdtrt.shard(self.model, hints, 3, strategy=strategy), self.inputs, 3, progress=False)
            assert mdtrt.compare_outputs(expected, outputs[2], atol=1e-4, rtol=1e-4).passed, strategy

    def test_ranks_must_match_the_hints(self):
        with pytest.raises(InvalidArgumentError, match="ranks is 4 but the hints are for 2 ranks"):
            mdtrt.shard(self.model, self.hints(2), 4)

    def test_strategy_field_and_argument(self, capsys):
        hints = self.hints(2)
        hints["strategy"] = "ring"
        sharded = mdtrt.shard(self.model, hints, 2)  # polygraphy never sees the field
        assert {n.op_type for n in sharded.graph.node} >= {"Exp", "ReduceMax"}
        with pytest.raises(InvalidArgumentError, match="strategy is 'ulysses' but the hints say 'ring'"):
            mdtrt.shard(self.model, hints, 2, strategy="ulysses")
        misspelt = r"strategy is 'rings' \(did you mean 'ring'\?\); it must be one of: allgather_kv, ulysses, ring$"
        with pytest.raises(InvalidArgumentError, match=misspelt):
            mdtrt.shard(self.model, self.hints(2), 2, strategy="rings")
        assert "ShardHints" not in capsys.readouterr().err  # no schema dump from polygraphy

    def test_missing_and_broken_files(self, tmp_path):
        with pytest.raises(InvalidArgumentError, match="hints: file .*missing.json does not exist"):
            mdtrt.shard(self.model, str(tmp_path / "missing.json"), 2)
        broken = tmp_path / "broken.json"
        broken.write_text("{ not json")
        with pytest.raises(InvalidArgumentError, match="not valid JSON"):
            mdtrt.shard(self.model, str(broken), 2)
        with pytest.raises(InvalidArgumentError, match="model: ONNX model file .*missing.onnx does not exist"):
            mdtrt.shard(str(tmp_path / "missing.onnx"), self.hints(2), 2)
        with pytest.raises(InvalidArgumentError, match="ranks must be a positive integer"):
            mdtrt.shard(self.model, self.hints(2), 0)
        assert issubclass(InvalidArgumentError, mdtrt.MdtrtError)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_layer_left_without_its_collectives_is_refused(monkeypatch, strategy):
    # As if the rewrite silently matched nothing (polygraphy's "0 attention pattern matches"):
    # the check after sharding names the layer and what is missing.
    model, hints, _, _ = model_and_reference("mdtrt", "float32")
    if strategy == "allgather_kv":
        real = sharding._run_polygraphy

        def no_gathers(source, polygraphy_hints, verbose):
            for layer in polygraphy_hints["attention_layers"]:
                layer["gather_kv"] = False
            return real(source, polygraphy_hints, verbose)

        monkeypatch.setattr(sharding, "_run_polygraphy", no_gathers)
        missing = "an all_gather of K"
    else:
        monkeypatch.setattr(sharding, "rewrite", lambda sharded, *args: sharded)
        missing = "an all_to_all of Q" if strategy == "ulysses" else "a broadcast of K"
    with pytest.raises(InvalidArgumentError, match=f"{strategy} left attention layer q='q_scaled' without {missing}"):
        mdtrt.shard(model, hints(2), 2, strategy=strategy)
