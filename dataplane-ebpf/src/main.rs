//! The data plane's eBPF programs, one object for every attach point.
//!
//! Logic is split by concern the way cilium splits `bpf/lib/*.h` (`parse`, `csum`, `lb`, `nat`,
//! `maps`, `cfg`, `stats`), with one thin entry module per attach point (`xdp`, `tc`, `sock`).
#![no_std]
#![no_main]

mod cfg;
mod csum;
mod ct;
mod fib;
mod lb;
mod maps;
mod mem;
mod nat;
mod parse;
mod sock;
mod stats;
mod tc;
mod xdp;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this, so it is never executed.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
