// A Rust program in the style people write, built by the tests with rustc's defaults
// for a release (-O; lld links it; no frame pointers) plus -g: generics, closures,
// iterator chains, trait objects, HashMap and sorting, so that LLVM inlines deeply.
use std::collections::HashMap;
use std::fmt::Write;

trait Shape {
    fn area(&self) -> f64;
}

struct Circle(f64);
struct Rect(f64, f64);

impl Shape for Circle {
    fn area(&self) -> f64 {
        std::f64::consts::PI * self.0 * self.0
    }
}

impl Shape for Rect {
    fn area(&self) -> f64 {
        self.0 * self.1
    }
}

fn word_counts(text: &str) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for word in text.split_whitespace() {
        *counts.entry(word.to_lowercase()).or_insert(0) += 1;
    }
    counts
}

fn primes(limit: usize) -> Vec<usize> {
    let mut sieve = vec![true; limit + 1];
    (2..=limit)
        .filter(|&n| {
            if sieve[n] {
                let mut m = n * n;
                while m <= limit {
                    sieve[m] = false;
                    m += n;
                }
                true
            } else {
                false
            }
        })
        .collect()
}

fn total_area(shapes: &[Box<dyn Shape>]) -> f64 {
    shapes.iter().map(|s| s.area()).sum()
}

fn main() {
    let rounds: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(3);
    let mut text = String::new();
    for i in 0..2000 {
        write!(text, "word{} Word{} other ", i % 17, i % 5).unwrap();
    }
    let mut checksum = 0usize;
    for round in 0..rounds {
        let counts = word_counts(&text);
        let mut sorted: Vec<_> = counts.into_iter().collect();
        sorted.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        checksum += sorted.len() + primes(20_000 + round).len();
        let shapes: Vec<Box<dyn Shape>> = (0..100)
            .map(|i| -> Box<dyn Shape> {
                if i % 2 == 0 { Box::new(Circle(i as f64)) } else { Box::new(Rect(i as f64, 2.0)) }
            })
            .collect();
        checksum += total_area(&shapes) as usize;
    }
    println!("{checksum}");
}
