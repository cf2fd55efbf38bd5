//! The rayon driver: the same blocked loops as `portable::gemm_blocked`, but each packed
//! panel of B is shared by all threads and every thread owns a band of C's rows.
//!
//! Splitting C by rows lets each thread write through its own `&mut` slice, so no unsafe
//! code is needed, and packing B once per panel (rather than once per thread) keeps that
//! work from growing with the thread count.

use rayon::prelude::*;

use super::portable::{self, beta_for_slice};
use super::{Element, MatMut, MatRef, Path, ShapeError, check_shapes, finish_degenerate};

/// Below this many multiply-adds (`m·n·k`), handing work to the pool costs more than it saves.
pub const MIN_PARALLEL_WORK: f64 = 64.0 * 64.0 * 64.0;

pub(super) fn par_gemm_with<T: Element>(
    path: Path,
    alpha: T,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    beta: T,
    mut c: MatMut<'_, T>,
) -> Result<(), ShapeError> {
    check_shapes(&a, &b, &c)?;
    if finish_degenerate(alpha, a.cols, beta, &mut c) {
        return Ok(());
    }
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let threads = rayon::current_num_threads();
    let tile = path.tile::<T>();
    let small = (m as f64) * (n as f64) * (k as f64) < MIN_PARALLEL_WORK;
    if threads <= 1 || small {
        path.gemm(alpha, a, b, beta, c);
        return Ok(());
    }
    if !c.rows_are_disjoint() {
        let ct = c.t();
        if ct.rows_are_disjoint() {
            // Column-major C: its transpose has disjoint rows, and Cᵀ = alpha·Bᵀ·Aᵀ + beta·Cᵀ.
            return par_gemm_with(path, alpha, b.t(), a.t(), beta, ct);
        }
        path.gemm(alpha, a, b, beta, ct.t());
        return Ok(());
    }
    if m <= tile.mr {
        path.gemm(alpha, a, b, beta, c);
        return Ok(());
    }

    let blocking = portable::blocking::<T>(tile);
    // Bands of at most `mc` rows, as many as a multiple of the thread count so the last
    // round of work is not left to one thread, each a whole number of register tiles.
    let bands = m.div_ceil(blocking.mc).next_multiple_of(threads);
    let band_rows = m.div_ceil(bands).next_multiple_of(tile.mr);
    let mut c_bands = Vec::with_capacity(bands);
    let mut rest = c;
    let mut r0 = 0;
    while rest.rows > 0 {
        let rows = band_rows.min(rest.rows);
        let (band, below) = rest.split_rows_at(rows);
        c_bands.push((r0, band));
        rest = below;
        r0 += rows;
    }

    let kc_max = portable::even_step(k, blocking.kc, 1);
    let nc_max = portable::even_step(n, blocking.nc, tile.nr);
    let mut b_buf = Vec::new();
    for jc in (0..n).step_by(nc_max) {
        let nc = nc_max.min(n - jc);
        for pc in (0..k).step_by(kc_max) {
            let kc = kc_max.min(k - pc);
            let b_packed = portable::aligned(&mut b_buf, kc * nc.next_multiple_of(tile.nr));
            b_packed
                .par_chunks_mut(kc * tile.nr)
                .with_min_len(4)
                .enumerate()
                .for_each(|(jp, panel)| {
                    let j0 = jp * tile.nr;
                    let cols = tile.nr.min(nc - j0);
                    portable::pack_with_width(
                        b.submatrix(pc, jc + j0, kc, cols).t(),
                        tile.nr,
                        panel,
                    );
                });
            let b_packed = &*b_packed;
            let beta = beta_for_slice(pc, beta);
            c_bands
                .par_iter_mut()
                .for_each_init(Vec::new, |a_buf, (r0, band)| {
                    let rows = band.rows;
                    path.block(
                        alpha,
                        a.submatrix(*r0, pc, rows, kc),
                        b_packed,
                        beta,
                        band.rb_mut().submatrix(0, jc, rows, nc),
                        a_buf,
                    );
                });
        }
    }
    Ok(())
}
