"""csrc/cuda/sass_mma.py reads cuobjdump's SASS text: each MMA loop's distance
from the shared-memory load of an MMA's B operand to the MMA. Checked here on
hand-written SASS in cuobjdump's layout, so no CUDA tools are needed."""
import importlib.util
from pathlib import Path

SPEC = importlib.util.spec_from_file_location(
    "sass_mma", Path(__file__).resolve().parents[1] / "csrc" / "cuda" / "sass_mma.py")
sass_mma = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(sass_mma)


def sass(lines):
    """cuobjdump's line layout: /*address*/ instruction ; /* encoding */"""
    return [(0x100 + 0x10 * i, text) for i, text in enumerate(lines)]


def test_a_b_operand_loaded_just_before_its_mma_is_one_instruction_away():
    body = ["LDS.64 R36, [R68+UR8]", "IMMA.16832.S8.S8 R36, R32.ROW, R36.COL, RZ"]
    assert sass_mma.load_distances(body) == [1]


def test_ldmatrix_covers_the_four_registers_it_writes():
    body = ["LDSM.16.M88.4 R28, [R8+0x1400]", "NOP", "IADD3 R1, R1, 0x1, RZ",
            "HMMA.16816.F32.BF16 R40, R36, R30.reuse, RZ"]
    assert sass_mma.load_distances(body) == [3]


def test_the_load_is_found_around_the_loop_end():
    # the B operand of the loop's first MMA comes from the previous turn's last load
    body = ["IMMA.16832.S8.S8 R8, R4.ROW, R36.COL, RZ", "IADD3 R1, R1, 0x1, RZ", "LDS.64 R36, [R2]",
            "BRA 0x100"]
    assert sass_mma.load_distances(body) == [2]


def test_a_b_operand_held_in_registers_has_no_distance():
    body = ["IMMA.16832.S8.S8 R8, R4.ROW, R36.COL, RZ", "LDS.64 R40, [R2]"]
    assert sass_mma.load_distances(body) == [None]


def test_only_backward_branches_around_mmas_are_loops():
    instrs = sass(["MOV R1, RZ",
                   "LDS.64 R36, [R2]",                            # 0x110: the loop's start
                   "IMMA.16832.S8.S8 R8, R4.ROW, R36.COL, RZ",
                   "@P0 BRA 0x110",                               # back: a loop with an MMA
                   "IADD3 R1, R1, 0x1, RZ",                       # 0x140
                   "@P1 BRA 0x140",                               # back, but no MMA inside
                   "BRA 0x1a0",                                   # forward: not a loop
                   "EXIT"])
    loops = list(sass_mma.mma_loops(instrs))
    assert [start for start, _ in loops] == [0x110]
    assert sass_mma.load_distances(loops[0][1]) == [1]
