//! The data plane's eBPF programs, one object for every attach point.
//!
//! Logic is split by concern (`parse`, `stats`), with one thin entry per attach point (`xdp`, `tc`).
#![no_std]
#![no_main]

mod parse;
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
