//! Helpers over `iovec` lists that describe caller (guest) memory.

use libc::iovec;

/// Total bytes described by `iov`.
pub fn iov_total_len(iov: &[iovec]) -> u64 {
    iov.iter().map(|v| v.iov_len as u64).sum()
}

/// Appends to `out` the iovecs describing bytes `skip..skip + len` of `iov`.
///
/// Only computes addresses; nothing is dereferenced. Stops early if `iov` is shorter.
pub fn iov_subrange(iov: &[iovec], mut skip: usize, mut len: usize, out: &mut Vec<iovec>) {
    for v in iov {
        if len == 0 {
            break;
        }
        if skip >= v.iov_len {
            skip -= v.iov_len;
            continue;
        }
        let take = (v.iov_len - skip).min(len);
        out.push(iovec {
            iov_base: (v.iov_base as usize + skip) as *mut libc::c_void,
            iov_len: take,
        });
        len -= take;
        skip = 0;
    }
}

/// The address of bytes `skip..skip + len` of `iov` when they lie within one iovec, else `None`.
///
/// Only computes addresses; nothing is dereferenced.
pub fn iov_contiguous(iov: &[iovec], mut skip: usize, len: usize) -> Option<*mut u8> {
    for v in iov {
        if skip >= v.iov_len {
            skip -= v.iov_len;
            continue;
        }
        return (v.iov_len - skip >= len).then(|| (v.iov_base as usize + skip) as *mut u8);
    }
    None
}

/// Zeroes bytes `skip..skip + len` of the memory described by `iov`.
///
/// # Safety
/// Every iovec must describe memory valid for writes of its full length.
pub unsafe fn iov_fill_zero(iov: &[iovec], skip: usize, len: usize) {
    for_each_segment(iov, skip, len, |ptr, n, _| {
        // SAFETY: the caller guarantees the iovec memory is writable; the segment lies
        // within one iovec.
        unsafe { std::ptr::write_bytes(ptr, 0, n) };
    });
}

/// Copies `src` into bytes `skip..skip + src.len()` of the memory described by `iov`.
///
/// # Safety
/// Every iovec must describe memory valid for writes of its full length, not overlapping
/// `src`.
pub unsafe fn iov_copy_from(iov: &[iovec], skip: usize, src: &[u8]) {
    for_each_segment(iov, skip, src.len(), |ptr, n, done| {
        // SAFETY: the caller guarantees the iovec memory is writable and disjoint from
        // `src`; `done + n <= src.len()` by construction of the segments.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr().add(done), ptr, n) };
    });
}

/// Copies bytes `skip..skip + dst.len()` of the memory described by `iov` into `dst`.
///
/// # Safety
/// Every iovec must describe memory valid for reads of its full length, not overlapping `dst`.
pub unsafe fn iov_copy_to(iov: &[iovec], skip: usize, dst: &mut [u8]) {
    let dst_ptr = dst.as_mut_ptr();
    for_each_segment(iov, skip, dst.len(), |ptr, n, done| {
        // SAFETY: the caller guarantees the iovec memory is readable and disjoint from `dst`;
        // `done + n <= dst.len()` by construction of the segments.
        unsafe { std::ptr::copy_nonoverlapping(ptr.cast_const(), dst_ptr.add(done), n) };
    });
}

/// Calls `f(ptr, len, bytes_done_before)` for each piece of `skip..skip + len` of `iov`.
fn for_each_segment(
    iov: &[iovec],
    mut skip: usize,
    mut len: usize,
    mut f: impl FnMut(*mut u8, usize, usize),
) {
    let mut done = 0;
    for v in iov {
        if len == 0 {
            break;
        }
        if skip >= v.iov_len {
            skip -= v.iov_len;
            continue;
        }
        let take = (v.iov_len - skip).min(len);
        f((v.iov_base as usize + skip) as *mut u8, take, done);
        done += take;
        len -= take;
        skip = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subrange_copy_and_zero_across_segments() {
        let mut a = [1u8; 5];
        let mut b = [1u8; 7];
        let iov = [
            iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: a.len(),
            },
            iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            },
        ];
        let mut sub = Vec::new();
        iov_subrange(&iov, 3, 6, &mut sub);
        assert_eq!(sub.len(), 2);
        assert_eq!(iov_total_len(&sub), 6);
        // SAFETY: the iovecs describe the local arrays a and b.
        unsafe {
            iov_copy_from(&iov, 3, &[9, 8, 7, 6]);
            iov_fill_zero(&iov, 9, 2);
        }
        assert_eq!(a, [1, 1, 1, 9, 8]);
        assert_eq!(b, [7, 6, 1, 1, 0, 0, 1]);
    }

    #[test]
    fn contiguous_only_within_one_segment() {
        let iov = [
            iovec {
                iov_base: 0x1000 as *mut libc::c_void,
                iov_len: 5,
            },
            iovec {
                iov_base: 0x8000 as *mut libc::c_void,
                iov_len: 7,
            },
        ];
        assert_eq!(iov_contiguous(&iov, 0, 5), Some(0x1000 as *mut u8));
        assert_eq!(iov_contiguous(&iov, 2, 3), Some(0x1002 as *mut u8));
        assert_eq!(iov_contiguous(&iov, 5, 7), Some(0x8000 as *mut u8));
        assert_eq!(iov_contiguous(&iov, 6, 6), Some(0x8001 as *mut u8));
        // Crosses from the first segment into the second.
        assert_eq!(iov_contiguous(&iov, 3, 4), None);
        // Longer than what is left.
        assert_eq!(iov_contiguous(&iov, 6, 7), None);
        assert_eq!(iov_contiguous(&iov, 12, 1), None);
        assert_eq!(iov_contiguous(&[], 0, 1), None);
    }
}
