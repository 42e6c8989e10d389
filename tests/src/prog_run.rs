//! BPF_PROG_RUN through aya's `TestRun`: verdict, output bytes and the kernel's time per run.
use aya::programs::{TestRun, TestRunOptions, TestRunResult};

/// What one test run returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutput {
    /// The program's return value (XDP action or TC verdict).
    pub verdict: u32,
    /// The packet as the program left it.
    pub data: Vec<u8>,
    /// The kernel's average run time per repetition, in nanoseconds.
    pub ns_per_run: u64,
}

/// Room a program may grow a packet by (encapsulation, XDP head adjustment).
const HEADROOM: usize = 256;

/// Runs `prog` once on `input` (XDP: `Xdp`; TC: `SchedClassifier`).
pub fn run<P>(prog: &P, input: &[u8]) -> RunOutput
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    run_repeat(prog, input, 1)
}

/// Runs `prog` `repeat` times in the kernel on `input`. With `repeat > 1` every iteration sees the
/// packet the previous one wrote (../shared/TOOLCHAIN.md): time rewrite paths accordingly.
pub fn run_repeat<P>(prog: &P, input: &[u8], repeat: u32) -> RunOutput
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let mut out = vec![0u8; input.len() + HEADROOM];
    let res = prog
        .test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            repeat,
            ..TestRunOptions::default()
        })
        .unwrap_or_else(|e| panic!("BPF_PROG_RUN failed on a {}-byte packet: {e}", input.len()));
    out.truncate(res.data_size_out as usize);
    RunOutput { verdict: res.return_value, data: out, ns_per_run: res.duration.as_nanos() as u64 }
}
