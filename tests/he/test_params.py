import pytest

from veil.errors import InsecureParametersError
from veil.he import PRESETS, CKKSParameters, HEContext, preset, preset_for


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_at_128_bits(name):
    params = preset(name)
    ctx = HEContext(params)
    assert ctx.seal.parameters_set()
    assert ctx.slot_count == params.poly_modulus_degree // 2


@pytest.mark.parametrize(
    ("n", "bits"),
    [(2048, (60, 60)), (4096, (60, 60)), (8192, (60, 60, 60, 60)), (1024, (30,))],
)
def test_parameters_over_the_128_bit_bound_are_refused(n, bits):
    with pytest.raises(InsecureParametersError, match="bits"):
        CKKSParameters(n, bits)


def test_security_levels_below_128_are_refused():
    with pytest.raises(InsecureParametersError):
        CKKSParameters(8192, (60,), security_bits=80)
    with pytest.raises(InsecureParametersError):
        CKKSParameters(8192, (60,), security_bits=0)


def test_malformed_parameters_are_typed_errors():
    with pytest.raises(InsecureParametersError):
        CKKSParameters(3000, (60,))
    with pytest.raises(InsecureParametersError):
        CKKSParameters(8192, (70,))
    with pytest.raises(InsecureParametersError):
        CKKSParameters.from_dict({"poly_modulus_degree": "x"})
    with pytest.raises(InsecureParametersError, match="unknown preset"):
        preset("tiny")


def test_preset_for_depth_and_rotations():
    assert not preset_for(0, rotations=False).uses_key_switching
    assert preset_for(0, rotations=True).uses_key_switching
    assert preset_for(2, rotations=True).poly_modulus_degree == 16384
    with pytest.raises(InsecureParametersError):
        preset_for(9, rotations=False)


def test_fingerprint_and_roundtrip():
    p = preset("depth0")
    q = CKKSParameters.from_dict(p.to_dict())
    assert p == q and p.fingerprint == q.fingerprint
    assert p.fingerprint != preset("depth0-rotations").fingerprint
