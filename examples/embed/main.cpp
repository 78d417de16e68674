// A program that links libpeekcore: fits a CP model to a tensor read from a
// .npy file (float16, float32 or float64, C order, N x I_1 x ... x I_d) and
// prints the fit.
//
//   embed_example <file.npy> <rank> [--nonneg] [--iters N] [--tol T]
//                 [--init f0.npy f1.npy ...] [--out DIR]
//   embed_example --write-demo <file.npy>   (a 200 x 12 x 10 rank-3 tensor, float32)
//
// --init takes one float64 factor per mode (I_m x rank); --out writes
// weights.npy, factor_<m>.npy and fit.npy (float64) there.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <numeric>
#include <peekcore/peekcore.hpp>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct Npy {
  peekcore::DType dtype = peekcore::DType::kFloat64;
  std::vector<std::int64_t> shape;
  std::vector<char> bytes;
};

// The .npy format: magic, version, header length, a Python dict literal, the data.
Npy read_npy(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  char magic[8];
  in.read(magic, 8);
  if (!in || std::memcmp(magic, "\x93NUMPY", 6) != 0)
    throw std::runtime_error(path + " is not a .npy file");
  std::uint32_t header_len = 0;
  if (magic[6] == 1) {
    unsigned char len[2];
    in.read(reinterpret_cast<char*>(len), 2);
    header_len = len[0] | (len[1] << 8);
  } else {
    unsigned char len[4];
    in.read(reinterpret_cast<char*>(len), 4);
    header_len =
        len[0] | (len[1] << 8) | (len[2] << 16) | (static_cast<std::uint32_t>(len[3]) << 24);
  }
  std::string header(header_len, '\0');
  in.read(header.data(), header_len);
  Npy out;
  auto field = [&](const std::string& key) {
    const auto at = header.find("'" + key + "'");
    if (at == std::string::npos) throw std::runtime_error(path + ": no " + key + " in the header");
    return header.substr(header.find(':', at) + 1);
  };
  const std::string descr = field("descr");
  if (descr.find("<f8") != std::string::npos)
    out.dtype = peekcore::DType::kFloat64;
  else if (descr.find("<f4") != std::string::npos)
    out.dtype = peekcore::DType::kFloat32;
  else if (descr.find("<f2") != std::string::npos)
    out.dtype = peekcore::DType::kFloat16;
  else
    throw std::runtime_error(path + ": only little-endian float16/32/64 data is read");
  if (field("fortran_order").find("True") < field("fortran_order").find(','))
    throw std::runtime_error(path + ": Fortran order; save it with np.ascontiguousarray");
  std::string shape = field("shape");
  shape = shape.substr(shape.find('(') + 1, shape.find(')') - shape.find('(') - 1);
  std::stringstream ss(shape);
  for (std::string item; std::getline(ss, item, ',');)
    if (item.find_first_of("0123456789") != std::string::npos)
      out.shape.push_back(std::stoll(item));
  const std::int64_t count =
      std::accumulate(out.shape.begin(), out.shape.end(), std::int64_t(1), std::multiplies<>());
  out.bytes.resize(count * peekcore::dtype_size(out.dtype));
  in.read(out.bytes.data(), static_cast<std::streamsize>(out.bytes.size()));
  if (!in) throw std::runtime_error(path + " is cut short");
  return out;
}

void write_npy(const std::string& path, const std::vector<std::int64_t>& shape, const char* descr,
               const void* data, std::size_t bytes) {
  std::string dims;
  for (auto n : shape) dims += std::to_string(n) + ", ";
  if (shape.size() > 1) dims.resize(dims.size() - 2);
  std::string header =
      "{'descr': '" + std::string(descr) + "', 'fortran_order': False, 'shape': (" + dims + "), }";
  header.append(63 - (10 + header.size()) % 64, ' ');
  header += '\n';
  std::ofstream out(path, std::ios::binary);
  out.write("\x93NUMPY\x01\x00", 8);
  const unsigned char len[2] = {static_cast<unsigned char>(header.size() & 0xff),
                                static_cast<unsigned char>(header.size() >> 8)};
  out.write(reinterpret_cast<const char*>(len), 2);
  out << header;
  out.write(static_cast<const char*>(data), static_cast<std::streamsize>(bytes));
  if (!out) throw std::runtime_error("cannot write " + path);
}

void write_demo(const std::string& path) {
  const std::int64_t n = 200, c = 12, s = 10, rank = 3;
  std::mt19937_64 gen(7);
  std::normal_distribution<double> normal;
  std::vector<double> a(n * rank), b(c * rank), f(s * rank);
  for (auto* v : {&a, &b, &f})
    for (auto& x : *v) x = normal(gen);
  std::vector<float> x(n * c * s);
  for (std::int64_t i = 0; i < n; ++i)
    for (std::int64_t j = 0; j < c; ++j)
      for (std::int64_t k = 0; k < s; ++k) {
        double v = 0.01 * normal(gen);
        for (std::int64_t r = 0; r < rank; ++r)
          v += a[i * rank + r] * b[j * rank + r] * f[k * rank + r];
        x[(i * c + j) * s + k] = static_cast<float>(v);
      }
  write_npy(path, {n, c, s}, "<f4", x.data(), x.size() * sizeof(float));
  std::cout << "wrote " << path << " (" << n << " x " << c << " x " << s << ", rank 3 + noise)\n";
}

int run(int argc, char** argv) {
  if (argc == 3 && std::string(argv[1]) == "--write-demo") {
    write_demo(argv[2]);
    return 0;
  }
  if (argc < 3) {
    std::cerr << "usage: embed_example <file.npy> <rank> [--nonneg] [--iters N] [--tol T] "
                 "[--init f0.npy ...] [--out DIR]\n       embed_example --write-demo <file.npy>\n";
    return 2;
  }
  const Npy x = read_npy(argv[1]);
  const int rank = std::stoi(argv[2]);
  peekcore::Options options;
  bool nonneg = false;
  std::string out_dir;
  for (int i = 3; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--nonneg") {
      nonneg = true;
    } else if (arg == "--iters" && i + 1 < argc) {
      options.n_iter_max = std::stoi(argv[++i]);
    } else if (arg == "--tol" && i + 1 < argc) {
      options.tol = std::stod(argv[++i]);
    } else if (arg == "--out" && i + 1 < argc) {
      out_dir = argv[++i];
    } else if (arg == "--init") {
      for (std::size_t m = 0; m < x.shape.size() && i + 1 < argc; ++m) {
        const Npy f = read_npy(argv[++i]);
        if (f.dtype != peekcore::DType::kFloat64)
          throw std::runtime_error("--init factors must be float64");
        const auto* v = reinterpret_cast<const double*>(f.bytes.data());
        options.init.emplace_back(v, v + f.bytes.size() / sizeof(double));
      }
    } else {
      throw std::runtime_error("unknown argument " + arg);
    }
  }
  const peekcore::Data data = peekcore::from_array(x.bytes.data(), x.dtype, x.shape);
  const peekcore::Result res =
      nonneg ? peekcore::ncp_hals(data, rank, options) : peekcore::cp_als(data, rank, options);
  std::string shape;
  for (auto n : x.shape) shape += (shape.empty() ? "" : " x ") + std::to_string(n);
  double per_iter = 0.0;  // after the first iteration, which also measures ||X||
  for (std::size_t k = 1; k < res.seconds.size(); ++k) per_iter += res.seconds[k];
  if (res.seconds.size() > 1) per_iter /= static_cast<double>(res.seconds.size() - 1);
  std::printf("%s rank %d of %s: %zu iterations (%s), fit %.6f\n", nonneg ? "ncp_hals" : "cp_als",
              rank, shape.c_str(), res.fit.size(), res.stop_reason.c_str(), res.fit.back());
  std::printf("seconds per iteration %.6f\n", per_iter);
  std::printf("weights");
  for (double w : res.weights) std::printf(" %.6g", w);
  std::printf("\n%s\n", peekcore::build_info().c_str());
  if (!out_dir.empty()) {
    const std::int64_t R = rank;
    write_npy(out_dir + "/weights.npy", {R}, "<f8", res.weights.data(), R * sizeof(double));
    write_npy(out_dir + "/fit.npy", {static_cast<std::int64_t>(res.fit.size())}, "<f8",
              res.fit.data(), res.fit.size() * sizeof(double));
    write_npy(out_dir + "/seconds.npy", {static_cast<std::int64_t>(res.seconds.size())}, "<f8",
              res.seconds.data(), res.seconds.size() * sizeof(double));
    for (std::size_t m = 0; m < res.factors.size(); ++m)
      write_npy(out_dir + "/factor_" + std::to_string(m) + ".npy", {x.shape[m], R}, "<f8",
                res.factors[m].data(), res.factors[m].size() * sizeof(double));
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& err) {
    std::cerr << "embed_example: " << err.what() << "\n";
    return 1;
  }
}
