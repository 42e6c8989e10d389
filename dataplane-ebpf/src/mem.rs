//! Zero-initialising stack structures without `memset`.
//!
//! On the bpf target LLVM lowers the zeroing of odd-sized or byte-aligned regions (a `[0; 3]`
//! pad, a zeroed `bpf_fib_lookup`) to calls into compiler_builtins' `memset`, a BPF-to-BPF
//! subprogram that stores one byte per loop iteration. Word stores do the same in a few
//! instructions; they are volatile so LLVM cannot merge them back into a `memset` call.
use core::mem::{MaybeUninit, align_of, size_of};

/// An all-zero `T` for a small value such as a map key (measured: stores only).
///
/// `T` must be valid when all-zero (plain `#[repr(C)]` data: map keys, helper argument
/// blocks), 4-byte aligned and a multiple of 4 bytes long; the last two are checked when
/// compiling.
#[inline(always)]
pub fn zeroed<T: Copy>() -> T {
    let mut v = MaybeUninit::<T>::uninit();
    *zeroed_in(&mut v)
}

/// Zeroes `slot` in place and returns it initialised. For larger blocks (`bpf_fib_lookup`): a
/// by-value copy of the result is what LLVM turned back into a `memset` call there.
#[inline(always)]
pub fn zeroed_in<T: Copy>(slot: &mut MaybeUninit<T>) -> &mut T {
    const { assert!(align_of::<T>() >= 4 && size_of::<T>() % 4 == 0) };
    let words = slot.as_mut_ptr().cast::<u32>();
    let mut i = 0;
    while i < size_of::<T>() / 4 {
        // SAFETY: in bounds (i < size / 4) and aligned (align >= 4), checked above.
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
        i += 1;
    }
    // SAFETY: every byte was written, and T is valid when all-zero (the caller's contract).
    unsafe { slot.assume_init_mut() }
}
