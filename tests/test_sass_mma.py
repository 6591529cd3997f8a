"""csrc/cuda/sass_mma.py reads cuobjdump's SASS text: each MMA loop's distance
from the shared-memory load of an MMA's B operand to the MMA, its stall counts
(the control bits' field) and the distance from each MMA to the first read of
its result. Checked here on hand-written SASS in cuobjdump's layout, so no CUDA
tools are needed."""
import importlib.util
from pathlib import Path

SPEC = importlib.util.spec_from_file_location(
    "sass_mma", Path(__file__).resolve().parents[1] / "csrc" / "cuda" / "sass_mma.py")
sass_mma = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(sass_mma)


def sass(lines):
    """(address, instruction, stall count) as sass_mma.functions reads them"""
    return [(0x100 + 0x10 * i, text, 1) for i, text in enumerate(lines)]


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
    assert [start for start, *_ in loops] == [0x110]
    assert sass_mma.load_distances(loops[0][1]) == [1]
    assert loops[0][2] == [1, 1, 1]


def test_cuobjdump_lines_give_the_instruction_and_its_control_word():
    text = ("        /*2950*/                   IMMA.16832.S8.S8 R40, R32.ROW, R38.COL, R80 ;"
            "                 /* 0x0000002620287237 */\n"
            "                                                                                 "
            "                /* 0x000fe20000441850 */\n")
    assert sass_mma.INSTR.findall(text) == [("2950", "IMMA.16832.S8.S8 R40, R32.ROW, R38.COL, R80 ", "000fe20000441850")]


def test_the_stall_count_is_bits_105_to_108_of_the_instruction():
    # the high word holds bits 64-127: the stall field at its bits 41-44; the yield bit
    # (45) and the barrier / reuse fields above must not leak into it
    assert sass_mma.stall_count(0xF << 41) == 15
    assert sass_mma.stall_count(0x9 << 41) == 9
    assert sass_mma.stall_count((1 << 45) | (0x3F << 52) | (1 << 40)) == 0


def test_an_mma_result_read_three_instructions_later_is_three_away():
    body = ["IMMA.16832.S8.S8 R40, R32.ROW, R38.COL, R80", "NOP", "FMUL R2, R3, R4", "FADD R7, R42, -12582912"]
    assert sass_mma.read_distances(body) == [3]


def test_an_mma_result_overwritten_before_any_read_has_no_distance():
    body = ["IMMA.16832.S8.S8 R40, R32.ROW, R38.COL, R80", "MOV R41, RZ", "FADD R7, R41, 1"]
    assert sass_mma.read_distances(body) == [None]


def test_a_store_of_an_mma_result_is_a_read_and_fp16_results_are_two_registers():
    # R22 is not among an fp16 result's two; the second store reads R21 as its address
    body = ["HMMA.16816.F16 R20, R4, R8, RZ", "STS [R2], R22", "STS [R21], R3"]
    assert sass_mma.read_distances(body) == [2]
    body = ["HMMA.16816.F32.BF16 R20, R4, R8, RZ", "STS [R2], R22"]
    assert sass_mma.read_distances(body) == [1]
