// A C++ program in the style people write: templates, lambdas, the standard library
// (std::sort, std::map, std::function, std::string), built -O2 -g by the tests so that
// GCC inlines, clones (.isra, .constprop) and splits hot/cold code as it does in the field.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

template <typename T>
struct Matrix {
    std::vector<T> cells;
    size_t n;
    explicit Matrix(size_t size) : cells(size * size), n(size) {}
    T &at(size_t r, size_t c) { return cells[r * n + c]; }
    Matrix multiply(Matrix &other) {
        Matrix out(n);
        for (size_t i = 0; i < n; i++)
            for (size_t k = 0; k < n; k++)
                for (size_t j = 0; j < n; j++)
                    out.at(i, j) += at(i, k) * other.at(k, j);
        return out;
    }
};

template <typename K, typename V>
V histogram_total(const std::map<K, V> &counts) {
    return std::accumulate(counts.begin(), counts.end(), V{},
                           [](V sum, const auto &entry) { return sum + entry.second; });
}

static std::string describe(int value) {
    if (value < 0)
        throw std::invalid_argument("negative: " + std::to_string(value));
    return "value-" + std::to_string(value);
}

template <typename F>
long apply_all(const std::vector<int> &values, F &&f) {
    long total = 0;
    for (int v : values)
        total += f(v);
    return total;
}

int main(int argc, char **argv) {
    int rounds = argc > 1 ? std::atoi(argv[1]) : 3;
    std::vector<int> values(5000);
    std::iota(values.begin(), values.end(), argc);
    std::map<std::string, long> counts;
    std::function<long(int)> weigh = [&](int v) { return static_cast<long>(describe(v).size()); };
    long total = 0;
    for (int round = 0; round < rounds; round++) {
        std::sort(values.begin(), values.end(), [round](int a, int b) {
            return (a ^ round) % 97 < (b ^ round) % 97;
        });
        total += apply_all(values, weigh);
        total += apply_all(values, [&counts](int v) {
            counts[std::to_string(v % 13)] += v;
            return v % 7;
        });
        Matrix<double> a(40), b(40);
        for (size_t i = 0; i < 40; i++)
            a.at(i, i) = b.at(i, (i + round) % 40) = 1.0 + i;
        total += static_cast<long>(a.multiply(b).at(3, 3));
    }
    try {
        describe(-argc);
    } catch (const std::invalid_argument &error) {
        total += static_cast<long>(std::string(error.what()).size());
    }
    std::printf("%ld %ld\n", total, histogram_total(counts));
    return 0;
}
