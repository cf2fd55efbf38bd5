//! Checks every GEMM path (dispatched, forced portable, and the rayon drivers) against the
//! naive f64 reference on random shapes up to 300 in each dimension, layouts (transposed,
//! padded, stepped, broadcast) and scalars, in f32 and f64, plus the edge cases the blocked
//! loops special-case: empty dimensions, NaN/Inf, `beta == 0`, shape errors.
//!
//! They also run under wasm32-wasip1 with `+simd128` (see `xtask/wasi-runner.mjs`), where
//! `gemm` is the simd128 path and `gemm_portable` the autovectorized loops, and as aarch64
//! under qemu (`xtask/src/cross.rs`), where `gemm` is the NEON path. `PROPTEST_CASES` sets
//! the number of cases per property; emulated runs lower it.

use proptest::prelude::*;
use tabgrid_shared::kernels::{self, Element, MatMut, MatRef, ShapeError, reference};

type GemmFn<T> = fn(T, MatRef<'_, T>, MatRef<'_, T>, T, MatMut<'_, T>) -> Result<(), ShapeError>;

fn paths<T: Element>() -> Vec<(&'static str, GemmFn<T>)> {
    let serial: [(&'static str, GemmFn<T>); 3] = [
        ("gemm", kernels::gemm::<T>),
        ("gemm_portable", kernels::gemm_portable::<T>),
        ("gemm_avx2", kernels::gemm_avx2::<T>),
    ];
    #[cfg(feature = "rayon")]
    let parallel: [(&'static str, GemmFn<T>); 3] = [
        ("par_gemm", kernels::par_gemm::<T>),
        ("par_gemm_portable", kernels::par_gemm_portable::<T>),
        ("par_gemm_avx2", kernels::par_gemm_avx2::<T>),
    ];
    #[cfg(not(feature = "rayon"))]
    let parallel: [(&'static str, GemmFn<T>); 0] = [];
    serial.into_iter().chain(parallel).collect()
}

/// Runs `f` in a pool of several threads so the rayon driver really splits C, however many
/// cores the test machine has.
fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    #[cfg(feature = "rayon")]
    {
        rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .expect("thread pool")
            .install(f)
    }
    #[cfg(not(feature = "rayon"))]
    f()
}

/// How a logical matrix is laid out in its buffer.
#[derive(Clone, Copy, Debug)]
enum Layout {
    RowMajor,
    /// Built as the transpose of a row-major buffer, to exercise `MatRef::t`.
    ColMajor,
    /// Rows `row_pad` slots apart beyond their extent, columns `col_step` apart; the gaps hold
    /// sentinels that must be neither read into the result nor overwritten. `transposed`
    /// swaps the roles: columns padded, rows stepped (a padded column-major layout).
    Strided {
        row_pad: usize,
        col_step: usize,
        transposed: bool,
    },
    /// Every row is the same slots (row stride 0), a broadcast; only inputs may be one.
    RepeatedRow,
}

/// Layouts an output may have: no two elements in one slot.
fn output_layout() -> impl Strategy<Value = Layout> {
    prop_oneof![
        Just(Layout::RowMajor),
        Just(Layout::ColMajor),
        (0usize..4, 1usize..4, any::<bool>()).prop_map(|(row_pad, col_step, transposed)| {
            Layout::Strided {
                row_pad,
                col_step,
                transposed,
            }
        }),
    ]
}

fn input_layout() -> impl Strategy<Value = Layout> {
    prop_oneof![6 => output_layout(), 1 => Just(Layout::RepeatedRow)]
}

/// SplitMix64, so a whole matrix comes from one proptest-chosen seed.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }
}

/// A matrix in a buffer of its own, with sentinels in the slots its layout skips.
#[derive(Clone, Debug)]
struct Stored<T> {
    data: Vec<T>,
    rows: usize,
    cols: usize,
    layout: Layout,
    row_stride: usize,
    col_stride: usize,
}

const SENTINEL: f64 = 12345.0;

impl<T: Element> Stored<T> {
    fn new(
        rows: usize,
        cols: usize,
        layout: Layout,
        mut value: impl FnMut(usize, usize) -> T,
    ) -> Self {
        let (row_stride, col_stride, len) = match layout {
            Layout::RowMajor => (cols, 1, rows * cols),
            Layout::ColMajor => (1, rows, rows * cols),
            Layout::Strided {
                row_pad,
                col_step,
                transposed,
            } => {
                // Lay out `lines` lines of `line_len` elements; the lines are the rows, or
                // the columns when transposed.
                let (lines, line_len) = if transposed {
                    (cols, rows)
                } else {
                    (rows, cols)
                };
                let line_stride = line_len.saturating_sub(1) * col_step + 1 + row_pad;
                let len = if rows == 0 || cols == 0 {
                    3
                } else {
                    (lines - 1) * line_stride + (line_len - 1) * col_step + 3
                };
                if transposed {
                    (col_step, line_stride, len)
                } else {
                    (line_stride, col_step, len)
                }
            }
            Layout::RepeatedRow => (0, 1, if rows == 0 { 0 } else { cols }),
        };
        let mut data = vec![T::from_f64(SENTINEL); len];
        for r in 0..rows {
            for c in 0..cols {
                data[r * row_stride + c * col_stride] = value(r, c);
            }
        }
        Self {
            data,
            rows,
            cols,
            layout,
            row_stride,
            col_stride,
        }
    }

    fn random(rows: usize, cols: usize, layout: Layout, rng: &mut Rng) -> Self {
        Self::new(rows, cols, layout, |_, _| T::from_f64(rng.unit()))
    }

    fn view(&self) -> MatRef<'_, T> {
        match self.layout {
            Layout::RowMajor => MatRef::row_major(&self.data, self.rows, self.cols).unwrap(),
            Layout::ColMajor => MatRef::row_major(&self.data, self.cols, self.rows)
                .unwrap()
                .t(),
            Layout::Strided { .. } | Layout::RepeatedRow => MatRef::new(
                &self.data,
                self.rows,
                self.cols,
                self.row_stride,
                self.col_stride,
            )
            .unwrap(),
        }
    }

    fn view_mut(&mut self) -> MatMut<'_, T> {
        match self.layout {
            Layout::RowMajor => MatMut::row_major(&mut self.data, self.rows, self.cols).unwrap(),
            _ => MatMut::new(
                &mut self.data,
                self.rows,
                self.cols,
                self.row_stride,
                self.col_stride,
            )
            .unwrap(),
        }
    }

    /// The element each buffer slot holds, if any.
    fn slots(&self) -> Vec<Option<(usize, usize)>> {
        let mut slots = vec![None; self.data.len()];
        for r in 0..self.rows {
            for c in 0..self.cols {
                slots[r * self.row_stride + c * self.col_stride] = Some((r, c));
            }
        }
        slots
    }

    /// Same layout, each element mapped through `f`.
    fn map<U: Element>(&self, f: impl Fn(T) -> U) -> Stored<U> {
        Stored {
            data: self.data.iter().map(|&x| f(x)).collect(),
            rows: self.rows,
            cols: self.cols,
            layout: self.layout,
            row_stride: self.row_stride,
            col_stride: self.col_stride,
        }
    }
}

/// What every path must produce for one product: the reference's C, and per slot the
/// magnitude `|alpha|·|A|·|B| + |beta|·|C|` of what was summed, which bounds the rounding.
struct Expected<T> {
    c: Stored<T>,
    magnitude: Stored<f64>,
}

impl<T: Element> Expected<T> {
    fn new(alpha: T, a: &Stored<T>, b: &Stored<T>, beta: T, c: &Stored<T>) -> Self {
        let mut expected = c.clone();
        reference::gemm(alpha, a.view(), b.view(), beta, expected.view_mut()).unwrap();

        let abs = |s: &Stored<T>| s.map(|x| x.to_f64().abs());
        let mut magnitude = abs(c);
        reference::gemm(
            alpha.to_f64().abs(),
            abs(a).view(),
            abs(b).view(),
            beta.to_f64().abs(),
            magnitude.view_mut(),
        )
        .unwrap();
        Self {
            c: expected,
            magnitude,
        }
    }
}

/// [`check_against`] a reference computed for this one call.
fn check<T: Element>(
    path: (&str, GemmFn<T>),
    alpha: T,
    a: &Stored<T>,
    b: &Stored<T>,
    beta: T,
    c: &Stored<T>,
    eps: f64,
) -> Result<(), TestCaseError> {
    let expected = Expected::new(alpha, a, b, beta, c);
    check_against(path, alpha, a, b, beta, c, &expected, eps)
}

/// Runs `path` and checks it element by element against the reference: NaN where the
/// reference has NaN, the same infinity where it has one, and otherwise within a rounding
/// bound that grows with k and with the magnitudes summed. Slots outside C's view must be
/// left as they were.
#[expect(
    clippy::too_many_arguments,
    reason = "the GEMM operands, then what to hold them to"
)]
fn check_against<T: Element>(
    (name, path): (&str, GemmFn<T>),
    alpha: T,
    a: &Stored<T>,
    b: &Stored<T>,
    beta: T,
    c: &Stored<T>,
    expected: &Expected<T>,
    eps: f64,
) -> Result<(), TestCaseError> {
    let Expected {
        c: expected,
        magnitude,
    } = expected;
    let mut got = c.clone();
    path(alpha, a.view(), b.view(), beta, got.view_mut()).unwrap();

    let k = a.cols as f64;
    for (slot, element) in c.slots().into_iter().enumerate() {
        let (g, e) = (got.data[slot].to_f64(), expected.data[slot].to_f64());
        let Some((r, col)) = element else {
            prop_assert_eq!(
                g,
                c.data[slot].to_f64(),
                "{}: slot {} outside C was written",
                name,
                slot
            );
            continue;
        };
        if e.is_nan() {
            prop_assert!(g.is_nan(), "{name}: C[{r},{col}] = {g}, expected NaN");
        } else if e.is_infinite() {
            prop_assert_eq!(g, e, "{}: C[{},{}]", name, r, col);
        } else {
            let tolerance = 2.0 * (k + 4.0) * eps * magnitude.data[slot] + 1e-300;
            prop_assert!(
                (g - e).abs() <= tolerance,
                "{name}: C[{r},{col}] = {g}, expected {e} (tolerance {tolerance:e}, m={} k={} n={})",
                a.rows,
                a.cols,
                b.cols
            );
        }
    }
    Ok(())
}

#[derive(Clone, Debug)]
struct Case {
    m: usize,
    k: usize,
    n: usize,
    layouts: [Layout; 3],
    alpha: f64,
    beta: f64,
    seed: u64,
}

fn scalar() -> impl Strategy<Value = f64> {
    prop_oneof![Just(0.0), Just(1.0), Just(-1.0), -2.0..2.0f64, -1e3..1e3f64]
}

/// 1 to 300, past the tiles and the `kc` of 256; one draw in four is at most 16, so that a
/// C of one partial tile and a k of one or two come up often.
fn dim() -> impl Strategy<Value = usize> {
    prop_oneof![3 => 1..=300usize, 1 => 1..=16usize]
}

fn case() -> impl Strategy<Value = Case> {
    (
        (dim(), dim(), dim()),
        (input_layout(), input_layout(), output_layout()),
        scalar(),
        scalar(),
        any::<u64>(),
    )
        .prop_map(|((m, k, n), (la, lb, lc), alpha, beta, seed)| Case {
            m,
            k,
            n,
            layouts: [la, lb, lc],
            alpha,
            beta,
            seed,
        })
}

/// A, B and C for `case`, with `specials` (which matrix, which element, which of NaN, +Inf
/// and -Inf) written over random elements.
fn operands<T: Element>(
    case: &Case,
    specials: &[(usize, prop::sample::Index, usize)],
) -> [Stored<T>; 3] {
    let mut rng = Rng(case.seed);
    let mut mats = [
        Stored::<T>::random(case.m, case.k, case.layouts[0], &mut rng),
        Stored::<T>::random(case.k, case.n, case.layouts[1], &mut rng),
        Stored::<T>::random(case.m, case.n, case.layouts[2], &mut rng),
    ];
    for &(which, at, value) in specials {
        let stored = &mut mats[which];
        let slots: Vec<usize> = stored
            .slots()
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.map(|_| i))
            .collect();
        let special = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY][value];
        stored.data[slots[at.index(slots.len())]] = T::from_f64(special);
    }
    mats
}

/// Every path on one case, against one reference computed for all of them.
fn check_case<T: Element>(
    case: &Case,
    specials: &[(usize, prop::sample::Index, usize)],
    eps: f64,
) -> Result<(), TestCaseError> {
    let [a, b, c] = &operands::<T>(case, specials);
    let (alpha, beta) = (T::from_f64(case.alpha), T::from_f64(case.beta));
    let expected = Expected::new(alpha, a, b, beta, c);
    in_pool(|| {
        paths::<T>()
            .into_iter()
            .try_for_each(|path| check_against(path, alpha, a, b, beta, c, &expected, eps))
    })
}

fn specials() -> impl Strategy<Value = Vec<(usize, prop::sample::Index, usize)>> {
    prop::collection::vec((0usize..3, any::<prop::sample::Index>(), 0usize..3), 1..8)
}

/// Cases per property unless `PROPTEST_CASES` says otherwise. Each costs two reference
/// products of up to 300³ multiply-adds (the expected C and the rounding bound).
const CASES: u32 = 256;

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(CASES);
    ProptestConfig::with_cases(cases)
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn f32_matches_reference(case in case()) {
        check_case::<f32>(&case, &[], f32::EPSILON as f64)?;
    }

    #[test]
    fn f64_matches_reference(case in case()) {
        check_case::<f64>(&case, &[], f64::EPSILON)?;
    }

    /// NaN and infinities scattered through A, B and C propagate as in the reference.
    #[test]
    fn f32_specials_propagate_like_reference(case in case(), specials in specials()) {
        check_case::<f32>(&case, &specials, f32::EPSILON as f64)?;
    }

    #[test]
    fn f64_specials_propagate_like_reference(case in case(), specials in specials()) {
        check_case::<f64>(&case, &specials, f64::EPSILON)?;
    }
}

/// Shapes past every blocking boundary: m past `mc`, k past `kc` (several slices of the inner
/// sum, so the `beta` of later slices matters), n past `nc`.
#[test]
fn larger_fixed_shapes() {
    let shapes = [(257, 129, 300), (70, 600, 50), (7, 5, 4100), (150, 520, 97)];
    for (i, &(m, k, n)) in shapes.iter().enumerate() {
        let case = Case {
            m,
            k,
            n,
            layouts: [
                Layout::RowMajor,
                [Layout::RowMajor, Layout::ColMajor][i % 2],
                Layout::RowMajor,
            ],
            alpha: 1.5,
            beta: -0.75,
            seed: i as u64,
        };
        check_case::<f32>(&case, &[], f32::EPSILON as f64).unwrap();
        check_case::<f64>(&case, &[], f64::EPSILON).unwrap();
        let overwrite = Case {
            beta: 0.0,
            layouts: [Layout::ColMajor, Layout::RowMajor, Layout::ColMajor],
            ..case
        };
        check_case::<f64>(&overwrite, &[], f64::EPSILON).unwrap();
    }
}

#[test]
fn one_by_one() {
    for path in paths::<f64>() {
        let mut c = [10.0];
        path.1(
            2.0,
            MatRef::row_major(&[3.0], 1, 1).unwrap(),
            MatRef::row_major(&[4.0], 1, 1).unwrap(),
            0.5,
            MatMut::row_major(&mut c, 1, 1).unwrap(),
        )
        .unwrap();
        assert_eq!(c, [29.0], "{}", path.0);
    }
}

#[test]
fn beta_zero_ignores_nan_in_c() {
    for negative_zero in [false, true] {
        let beta = if negative_zero { -0.0 } else { 0.0 };
        for (m, k, n) in [(5, 7, 9), (40, 300, 33)] {
            let mut rng = Rng(7);
            let a = Stored::<f32>::random(m, k, Layout::RowMajor, &mut rng);
            let b = Stored::<f32>::random(k, n, Layout::RowMajor, &mut rng);
            let c = Stored::<f32>::new(m, n, Layout::RowMajor, |_, _| f32::NAN);
            for path in paths::<f32>() {
                let mut got = c.clone();
                in_pool(|| path.1(1.0, a.view(), b.view(), beta, got.view_mut())).unwrap();
                assert!(
                    got.data.iter().all(|x| x.is_finite()),
                    "{} left NaN in C",
                    path.0
                );
                check(path, 1.0, &a, &b, beta, &c, f32::EPSILON as f64).unwrap();
            }
        }
    }
}

#[test]
fn nan_alpha_and_beta_poison_every_element() {
    let a = Stored::<f64>::new(3, 4, Layout::RowMajor, |r, c| (r + c) as f64);
    let b = Stored::<f64>::new(4, 5, Layout::RowMajor, |r, c| (r * c) as f64);
    let c = Stored::<f64>::new(3, 5, Layout::RowMajor, |_, _| 1.0);
    for (alpha, beta) in [
        (f64::NAN, 1.0),
        (1.0, f64::NAN),
        (f64::NAN, 0.0),
        (0.0, f64::INFINITY),
    ] {
        for path in paths::<f64>() {
            let mut got = c.clone();
            path.1(alpha, a.view(), b.view(), beta, got.view_mut()).unwrap();
            assert!(
                got.data.iter().all(|x| !x.is_finite()),
                "{}: alpha={alpha} beta={beta}: {:?}",
                path.0,
                got.data
            );
            check(path, alpha, &a, &b, beta, &c, f64::EPSILON).unwrap();
        }
    }
}

/// Every combination of empty and non-empty dimensions: an empty C is left alone, and with
/// k == 0 the product is an empty sum, so C becomes `beta·C` (zero when beta is 0, even over NaN).
#[test]
fn zero_sized_dimensions() {
    for m in [0, 1, 3] {
        for k in [0, 1, 3] {
            for n in [0, 1, 3] {
                for beta in [0.0, 2.0] {
                    let a = Stored::<f64>::new(m, k, Layout::RowMajor, |_, _| 1.0);
                    let b = Stored::<f64>::new(k, n, Layout::ColMajor, |_, _| 1.0);
                    let c = Stored::<f64>::new(
                        m,
                        n,
                        Layout::Strided {
                            row_pad: 1,
                            col_step: 2,
                            transposed: false,
                        },
                        |r, c| (r + c) as f64,
                    );
                    for path in paths::<f64>() {
                        check(path, 3.0, &a, &b, beta, &c, f64::EPSILON).unwrap();
                        if k == 0 {
                            let mut got = c.map(|x| if x == SENTINEL { x } else { f64::NAN });
                            path.1(3.0, a.view(), b.view(), 0.0, got.view_mut()).unwrap();
                            let view = got.view_mut();
                            for r in 0..m {
                                for col in 0..n {
                                    assert_eq!(view.get(r, col), 0.0, "{}", path.0);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn shape_errors_name_the_shapes_and_leave_c_alone() {
    let a = vec![1.0f32; 12];
    let b = vec![1.0f32; 10];
    let mut c = vec![7.0f32; 6];
    for path in paths::<f32>()
        .into_iter()
        .chain([("reference", reference::gemm::<f32> as GemmFn<f32>)])
    {
        let err = path.1(
            1.0,
            MatRef::row_major(&a, 3, 4).unwrap(),
            MatRef::row_major(&b, 5, 2).unwrap(),
            0.0,
            MatMut::row_major(&mut c, 3, 2).unwrap(),
        )
        .unwrap_err();
        assert_eq!(
            err,
            ShapeError::InnerDimension {
                a_rows: 3,
                a_cols: 4,
                b_rows: 5,
                b_cols: 2
            }
        );
        assert_eq!(
            err.to_string(),
            "A is 3x4 but B is 5x2: inner dimensions differ"
        );

        let err = path.1(
            1.0,
            MatRef::row_major(&a, 3, 4).unwrap(),
            MatRef::row_major(&b[..8], 4, 2).unwrap(),
            0.0,
            MatMut::row_major(&mut c, 2, 3).unwrap(),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "A is 3x4 and B is 4x2, so C must be 3x2, but it is 2x3"
        );
        assert_eq!(c, [7.0; 6], "{}", path.0);
    }
}

#[test]
fn view_constructors_reject_bad_buffers() {
    let data = [0.0f64; 12];
    let err = MatRef::row_major(&data, 3, 5).unwrap_err();
    assert_eq!(
        err,
        ShapeError::BufferLength {
            rows: 3,
            cols: 5,
            len: 12
        }
    );
    assert_eq!(
        err.to_string(),
        "a 3x5 row-major matrix needs 15 elements but the buffer holds 12"
    );
    assert!(MatRef::row_major(&data, usize::MAX, 2).is_err());

    // The last element (2, 3) sits at 2*5 + 3 = 13, past the end.
    let err = MatRef::new(&data, 3, 4, 5, 1).unwrap_err();
    assert_eq!(
        err.to_string(),
        "a 3x4 view with strides (5, 1) reaches past the end of its 12-element buffer"
    );
    assert!(MatRef::new(&data, 3, 4, 4, 1).is_ok());
    assert!(MatRef::new(&data, 2, usize::MAX, 1, usize::MAX).is_err());
    // Empty views need no buffer, and a zero stride broadcasts.
    assert!(MatRef::new(&data[..0], 0, 100, 7, 7).is_ok());
    assert!(MatRef::new(&data[..1], 4, 4, 0, 0).is_ok());

    let mut out = [0.0f64; 12];
    let err = MatMut::new(&mut out, 4, 4, 0, 1).unwrap_err();
    assert_eq!(
        err,
        ShapeError::OverlappingOutput {
            rows: 4,
            cols: 4,
            row_stride: 0,
            col_stride: 1
        }
    );
    assert!(
        MatMut::new(&mut out, 3, 3, 2, 1).is_err(),
        "rows overlap by one slot"
    );
    assert!(MatMut::new(&mut out, 3, 4, 1, 3).is_ok(), "column-major");
    assert!(
        MatMut::new(&mut out, 1, 12, 0, 1).is_ok(),
        "one row needs no row stride"
    );
    assert!(
        MatMut::new(&mut out, 2, 3, 5, 2).is_ok(),
        "rows interleave nowhere"
    );
    assert!(MatMut::row_major(&mut out, 2, 5).is_err());
}

#[test]
fn views_transpose_slice_and_split() {
    let data: Vec<f64> = (0..24).map(f64::from).collect();
    let a = MatRef::row_major(&data, 4, 6).unwrap();
    assert_eq!((a.rows(), a.cols(), a.get(2, 3)), (4, 6, 15.0));
    let t = a.t();
    assert_eq!((t.rows(), t.cols(), t.get(3, 2)), (6, 4, 15.0));
    let sub = a.submatrix(1, 2, 3, 3);
    assert_eq!(
        (sub.rows(), sub.cols(), sub.get(0, 0), sub.get(2, 2)),
        (3, 3, 8.0, 22.0)
    );
    let empty = a.submatrix(4, 6, 0, 0);
    assert_eq!((empty.rows(), empty.cols()), (0, 0));

    let mut out = vec![0.0f64; 24];
    let c = MatMut::row_major(&mut out, 4, 6).unwrap();
    assert!(c.rows_are_disjoint());
    let (mut top, mut bottom) = c.split_rows_at(1);
    top.set(0, 5, 1.0);
    bottom.set(2, 0, 2.0);
    *bottom.get_mut(0, 1) = 3.0;
    assert_eq!(
        (
            top.rows(),
            bottom.rows(),
            bottom.get(2, 0),
            bottom.as_ref().get(0, 1)
        ),
        (1, 3, 2.0, 3.0)
    );
    assert_eq!((out[5], out[18], out[7]), (1.0, 2.0, 3.0));

    let mut out = vec![0.0f64; 24];
    let col_major = MatMut::new(&mut out, 4, 6, 1, 4).unwrap();
    assert!(!col_major.rows_are_disjoint());
    let mut row_major = col_major.t();
    assert!(row_major.rows_are_disjoint());
    row_major.set(5, 2, 4.0);
    let (top, bottom) = row_major.split_rows_at(6);
    assert_eq!((top.rows(), bottom.rows()), (6, 0));
    assert_eq!(out[5 * 4 + 2], 4.0);
}

/// The message of the panic `f` must raise. Only where panics unwind: under
/// wasm32-wasip1 a panic aborts the whole test binary.
#[cfg(panic = "unwind")]
fn panic_message(f: impl FnOnce()) -> String {
    let payload =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).expect_err("expected a panic");
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_default()
}

#[test]
#[cfg(panic = "unwind")]
fn submatrix_out_of_range_panics() {
    let data = [0.0f32; 6];
    let message = panic_message(|| {
        let _ = MatRef::row_major(&data, 2, 3)
            .unwrap()
            .submatrix(1, 1, 2, 1);
    });
    assert!(message.contains("does not fit"), "{message}");
}

#[test]
#[cfg(panic = "unwind")]
fn splitting_interleaved_rows_panics() {
    let mut out = [0.0f32; 6];
    let message = panic_message(|| {
        let _ = MatMut::new(&mut out, 2, 3, 1, 2).unwrap().split_rows_at(1);
    });
    assert!(message.contains("interleave"), "{message}");
}

#[test]
fn active_path_names_the_dispatched_kernel() {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
    {
        assert_eq!(kernels::active_path(), "x86_64-avx512f");
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        assert_eq!(kernels::active_path(), "x86_64-avx2-fma");
        return;
    }
    if cfg!(all(target_arch = "wasm32", target_feature = "relaxed-simd")) {
        assert_eq!(kernels::active_path(), "wasm32-relaxed-simd");
        return;
    }
    if cfg!(all(target_arch = "wasm32", target_feature = "simd128")) {
        assert_eq!(kernels::active_path(), "wasm32-simd128");
        return;
    }
    if cfg!(all(target_arch = "aarch64", target_feature = "neon")) {
        assert_eq!(kernels::active_path(), "aarch64-neon");
        return;
    }
    assert_eq!(kernels::active_path(), "portable");
}

#[test]
fn element_conversions() {
    assert_eq!(<f32 as Element>::from_f64(0.1), 0.1f32);
    assert_eq!(Element::to_f64(0.5f32), 0.5);
    assert_eq!(Element::mul_add(2.0f64, 3.0, 1.0), 7.0);
    assert_eq!(Element::mul_add(2.0f32, 3.0, 1.0), 7.0);
    assert_eq!((<f32 as Element>::ZERO, <f32 as Element>::ONE), (0.0, 1.0));
    assert_eq!((<f64 as Element>::ZERO, <f64 as Element>::ONE), (0.0, 1.0));
}
