//! Symbols for the Rust v0 demangler test (tests/unit/test_demangle_rust_v0.py), built with
//! `rustc -C symbol-mangling-version=v0 -C opt-level=0 --crate-type bin`. Every construct
//! below is here to put one kind of v0 mangling into the symbol table: generics, trait and
//! inherent impls, closures, non-ASCII identifiers (punycode), const generics, dyn traits,
//! fn pointers with late-bound lifetimes, arrays, slices, tuples, raw pointers, nested
//! modules. Keep it compiling on Debian 12's rustc 1.63 (no let-else, no GATs).
#![allow(dead_code, non_snake_case, uncommon_codepoints, mixed_script_confusables)]

use std::collections::HashMap;
use std::fmt::Debug;

pub trait Shape {
    fn area(&self) -> f64;
    fn name(&self) -> String {
        String::from("shape")
    }
}

pub struct Circle {
    r: f64,
}

pub struct Square<T> {
    side: T,
}

impl Shape for Circle {
    fn area(&self) -> f64 {
        3.14159 * self.r * self.r
    }
}

impl<T: Copy + Into<f64>> Shape for Square<T> {
    fn area(&self) -> f64 {
        let s: f64 = self.side.into();
        s * s
    }
    fn name(&self) -> String {
        format!("square of {}", self.area())
    }
}

impl<T: Debug> Square<T> {
    #[inline(never)]
    pub fn describe(&self) -> String {
        format!("{:?}", self.side)
    }
}

impl dyn Shape {
    #[inline(never)]
    pub fn doubled(&self) -> f64 {
        2.0 * self.area()
    }
}

pub mod outer {
    pub mod inner {
        pub mod deepest {
            #[inline(never)]
            pub fn leaf<T: Clone>(value: &T) -> (T, T) {
                (value.clone(), value.clone())
            }
        }

        pub struct Wrapper<'a, T: ?Sized>(pub &'a T);

        impl<'a, T: ?Sized + AsRef<[u8]>> Wrapper<'a, T> {
            #[inline(never)]
            pub fn len(&self) -> usize {
                self.0.as_ref().len()
            }
        }
    }

    #[inline(never)]
    pub fn through<F: Fn(u32) -> u32>(f: F, x: u32) -> u32 {
        f(x) + 1
    }
}

pub mod grüße {
    #[inline(never)]
    pub fn größe(x: u8) -> u8 {
        x.wrapping_mul(3)
    }

    #[inline(never)]
    pub fn 日本語() -> &'static str {
        "nihongo"
    }

    pub struct Straße<const N: usize>;

    impl<const N: usize> Straße<N> {
        #[inline(never)]
        pub fn länge(&self) -> usize {
            N
        }
    }
}

pub struct Buffer<T, const N: usize> {
    items: [T; N],
}

impl<T: Copy + Default, const N: usize> Buffer<T, N> {
    #[inline(never)]
    pub fn new() -> Self {
        Buffer { items: [T::default(); N] }
    }
    #[inline(never)]
    pub fn first(&self) -> Option<&T> {
        self.items.first()
    }
}

#[inline(never)]
pub fn flag<const B: bool>() -> bool {
    !B
}

#[inline(never)]
pub fn letter<const C: char>() -> u32 {
    C as u32
}

#[inline(never)]
pub fn signed<const X: i32>() -> i64 {
    X as i64 * 2
}

#[inline(never)]
pub fn wide<const X: u128>() -> u128 {
    X / 3
}

#[inline(never)]
pub fn tiny<const X: i8>() -> i8 {
    X.wrapping_neg()
}

#[inline(never)]
pub fn total(shapes: &[Box<dyn Shape + Send>]) -> f64 {
    shapes.iter().map(|s| s.area()).sum()
}

#[inline(never)]
pub fn boxed_iter(n: u32) -> Box<dyn Iterator<Item = u32>> {
    Box::new((0..n).filter(|x| x % 2 == 0))
}

#[inline(never)]
pub fn apply<F>(f: F, value: &u8) -> u8
where
    F: for<'a> Fn(&'a u8) -> u8,
{
    f(value)
}

#[inline(never)]
pub fn call_boxed(f: Box<dyn for<'a> Fn(&'a u8) -> u8 + Send>, x: u8) -> u8 {
    f(&x)
}

#[inline(never)]
pub fn call_ptr<P: Copy>(p: P) -> P {
    p
}

extern "C" fn c_abi(x: i32) -> i32 {
    x + 1
}

fn reference_fn(x: &u8) -> u8 {
    *x + 2
}

#[inline(never)]
pub fn generic_pair<A: Debug, B: Debug>(a: A, b: B) -> String {
    format!("{:?}/{:?}", a, b)
}

#[inline(never)]
pub fn raw<T>(p: *const T, q: *mut T) -> bool {
    p as *const u8 == q as *const u8
}

pub struct Unit;

impl Iterator for Unit {
    type Item = (u8, char);
    fn next(&mut self) -> Option<(u8, char)> {
        None
    }
}

fn main() {
    let shapes: Vec<Box<dyn Shape + Send>> =
        vec![Box::new(Circle { r: 1.0 }), Box::new(Square { side: 2u8 }), Box::new(Square { side: 1.5f32 })];
    let mut sum = total(&shapes);
    for s in &shapes {
        sum += s.name().len() as f64;
    }
    let c: &dyn Shape = &Circle { r: 2.0 };
    sum += c.doubled();
    sum += Square { side: 3u16 }.describe().len() as f64;
    sum += Square { side: "str" }.describe().len() as f64;

    let (a, b) = outer::inner::deepest::leaf(&vec![1u64, 2, 3]);
    let (c2, _) = outer::inner::deepest::leaf(&("x", 'y', [1i16; 3]));
    sum += (a.len() + b.len() + c2.2.len()) as f64;
    sum += outer::inner::Wrapper("abc").len() as f64;
    sum += outer::inner::Wrapper(&[1u8, 2][..]).len() as f64;
    let offset = sum as u32;
    sum += outer::through(|x| x * 2 + offset, 5) as f64;
    sum += outer::through(move |x| x.rotate_left(offset), 6) as f64;

    sum += grüße::größe(4) as f64 + grüße::日本語().len() as f64;
    sum += grüße::Straße::<7>.länge() as f64;

    let buf: Buffer<i64, 4> = Buffer::new();
    let buf2: Buffer<(u8, bool), 2> = Buffer::new();
    sum += *buf.first().unwrap() as f64 + buf2.first().unwrap().0 as f64;
    sum += flag::<true>() as u8 as f64 + flag::<false>() as u8 as f64;
    sum += (letter::<'z'>() + letter::<'ß'>() + letter::<'\n'>() + letter::<'\''>()) as f64;
    sum += (signed::<-5>() + signed::<{ i32::MIN }>() + signed::<1000>()) as f64;
    sum += wide::<{ u128::MAX }>() as f64 + tiny::<-128>() as f64;

    sum += boxed_iter(10).sum::<u32>() as f64;
    sum += apply(reference_fn, &3) as f64;
    sum += apply(|x: &u8| *x + 1, &4) as f64;
    sum += call_boxed(Box::new(move |x: &u8| *x ^ offset as u8), 9) as f64;
    let f: fn(&u8) -> u8 = call_ptr(reference_fn as fn(&u8) -> u8);
    let g: extern "C" fn(i32) -> i32 = call_ptr(c_abi as extern "C" fn(i32) -> i32);
    let h: unsafe fn(*const u8) -> u8 = call_ptr(std::ptr::read::<u8> as unsafe fn(*const u8) -> u8);
    sum += f(&1) as f64 + g(2) as f64 + unsafe { h(&5u8) } as f64;
    sum += generic_pair((1u8, -2i32), [Some(3u64)]).len() as f64;
    sum += generic_pair(&["a", "b"][..], ((), 'c', 2.5f32)).len() as f64;
    let mut v = 7u8;
    sum += raw(&v as *const u8, &mut v as *mut u8) as u8 as f64;

    let mut map: HashMap<String, Vec<(u8, char)>> = HashMap::new();
    map.entry("k".to_string()).or_default().extend(Unit);
    sum += map.len() as f64;
    let mut words: Vec<&str> = "b a c".split(' ').collect();
    words.sort_by_key(|w| w.len());
    sum += words.len() as f64;
    println!("{}", sum);
}
