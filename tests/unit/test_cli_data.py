"""``--data``: one parser for every command, typing values as pyinfra's CLI does."""

import pytest
from pyinfra_cli.util import parse_cli_arg

from gpufleet.cli.data import DataError, parse_data, parse_value


def test_parse_data_like_pyinfra():
    data = parse_data(["quantization=fp16", "cold_start_timeout=20",
                       'container_env={"VLLM_STANDIN_FAIL":"never-healthy"}', "x=true"])
    assert data == {"quantization": "fp16", "cold_start_timeout": 20,
                    "container_env": {"VLLM_STANDIN_FAIL": "never-healthy"}, "x": True}
    with pytest.raises(DataError, match="key=value"):
        parse_data(["novalue"])


@pytest.mark.parametrize("text", ["fp16", "20", "true", "False", "1.10", '{"a":"b"}', "[1,2]",
                                  "null", "", "main", "0x10"])
def test_values_are_typed_exactly_as_pyinfras_cli_types_them(text):
    assert parse_value(text) == parse_cli_arg(text)
