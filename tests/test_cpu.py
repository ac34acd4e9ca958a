"""CPU facts: the model name and the matrix instruction sets are read from the system, and every report names them."""

from pathlib import Path

from diffship.host.cpu import cpu_facts, describe

ZEN5 = "processor\t: 0\nmodel name\t: AMD EPYC 9R45\nflags\t\t: fpu avx2 avx512f avx512_vnni avx512_bf16\n"
SAPPHIRE = ("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8488C\n"
            "flags\t\t: fpu avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8\n")


def test_each_cpu_kind_is_told_apart_by_its_flags(tmp_path: Path):
    facts = {}
    for name, text in (("zen5", ZEN5), ("spr", SAPPHIRE)):
        (tmp_path / name).write_text(text)
        facts[name] = cpu_facts(tmp_path / name)
    assert facts["zen5"]["kind"] == "x86 with AVX-512 VNNI + BF16" and not facts["zen5"]["isa"]["amx_int8"]
    assert facts["spr"]["kind"] == "x86 with AMX" and facts["spr"]["isa"]["amx_int8"]
    assert describe(facts["zen5"]) == "AMD EPYC 9R45 (x86 with AVX-512 VNNI + BF16: AVX-512 VNNI, AVX-512 BF16)"
    assert "AMX-INT8" in describe(facts["spr"]) and "Platinum 8488C" in describe(facts["spr"])


def test_this_machine_is_described_from_proc_cpuinfo():
    facts = cpu_facts()
    text = Path("/proc/cpuinfo").read_text()
    assert facts["model"] in text
    assert facts["isa"]["avx512f"] == (" avx512f" in text)


def test_the_report_header_names_the_cpu_kind(built):
    report = (built("tiny-sd").out / "report" / "report.md").read_text()
    assert f"Machine: {describe()}" in report
