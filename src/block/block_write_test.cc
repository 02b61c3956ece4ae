// The write path against a flat in-memory model: random writes, compressed writes,
// write-zeroes, discards, flushes, reopens and resizes on images of many option combinations made
// by qemu-img. After every step what qcow2kit reads equals the model; at the end qemu-img check
// finds no errors or leaks, qemu-img compare finds the image equal to the model, and every range
// qemu-img map reports as zero is zero in the model.
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "qcow2kit/block.h"
#include "qcow2kit/image.h"
#include "qcow2kit/reactor.h"
#include "testing/test_util.h"

namespace qcow2kit {
namespace {

struct ModelCase {
  std::string name;
  std::vector<std::string> setup;  // makes img.qcow2 (and its model.raw) in the scratch dir
  uint64_t size;
  int steps;
};
void PrintTo(const ModelCase& c, std::ostream* os) {
  *os << c.name;
}

class ModelTest : public ::testing::TestWithParam<ModelCase> {
 protected:
  void SetUp() override {
    reactor_ = testing::NewReactor();
    for (const auto& cmd : GetParam().setup) testing::MustRun("cd " + dir_.path() + " && " + cmd);
    testing::MustRun("cd " + dir_.path() +
                     " && qemu-img convert -O raw img.qcow2 model.raw && cp model.raw initial.raw");
    auto bytes = testing::ReadWholeFile(dir_ / "model.raw");
    model_.assign(reinterpret_cast<std::byte*>(bytes.data()),
                  reinterpret_cast<std::byte*>(bytes.data()) + bytes.size());
    Reopen();
  }

  void Reopen() {
    if (dev_) {
      Status s = reactor_->BlockOn(dev_->Close());
      ASSERT_TRUE(s.ok()) << s.ToString();
      dev_.reset();
    }
    OpenOptions o;
    o.writable = true;
    auto img = reactor_->BlockOn(OpenImage(dir_ / "img.qcow2", o));
    ASSERT_TRUE(img.ok()) << img.status().ToString();
    dev_ = std::make_unique<BlockDevice>(std::move(*img));
  }

  void CheckRange(uint64_t off, uint64_t len, const std::string& after) {
    std::vector<std::byte> got(len);
    Status s = reactor_->BlockOn(dev_->Read(off, got));
    ASSERT_TRUE(s.ok()) << s.ToString();
    for (uint64_t i = 0; i < len; ++i) {
      ASSERT_EQ(got[i], model_[off + i]) << "guest offset " << off + i << " after " << after;
    }
  }

  testing::ScratchDir dir_;
  std::unique_ptr<Reactor> reactor_;
  std::unique_ptr<BlockDevice> dev_;
  std::vector<std::byte> model_;
};

TEST_P(ModelTest, RandomOperationsMatchTheModel) {
  std::mt19937_64 rng(std::hash<std::string>{}(GetParam().name));
  auto pick_len = [&](uint64_t max) {
    uint64_t kinds[] = {1, 512, 4096, 65536, 3 * 65536 + 100, 1 << 20};
    uint64_t n = kinds[rng() % 6];
    if (rng() % 3 == 0) n = 1 + rng() % n;
    return std::min(n, max);
  };
  const uint64_t initial_size = model_.size();
  for (int step = 0; step < GetParam().steps; ++step) {
    const uint64_t size = model_.size();
    uint64_t off = rng() % size;
    if (rng() % 2) off = off / 512 * 512;
    uint64_t len = pick_len(size - off);
    std::string what;
    switch (rng() % 12) {
      case 0:
      case 1:
      case 2:
      case 3:
      case 4: {
        std::vector<std::byte> data(len, std::byte(1 + step % 250));
        for (uint64_t i = 0; i < len; i += 97) data[i] = std::byte(rng());
        what = "write";
        Status s = reactor_->BlockOn(dev_->Write(off, data, rng() % 8 == 0));
        ASSERT_TRUE(s.ok()) << s.ToString();
        std::copy(data.begin(), data.end(), model_.begin() + off);
        break;
      }
      case 5:
      case 6: {
        what = "write-zeroes";
        Status s = reactor_->BlockOn(dev_->WriteZeroes(off, len, rng() % 2));
        ASSERT_TRUE(s.ok()) << s.ToString();
        std::fill(model_.begin() + off, model_.begin() + off + len, std::byte{0});
        break;
      }
      case 7: {
        // Discard leaves partial clusters alone; only check that discarded whole clusters
        // read as zeros (they do on v3 and on v2 without a backing file).
        what = "discard";
        uint64_t cs = dev_->top().cluster_size();
        Status s = reactor_->BlockOn(dev_->Discard(off, len));
        ASSERT_TRUE(s.ok()) << s.ToString();
        uint64_t a = (off + cs - 1) / cs * cs;
        uint64_t b = off + len == size ? size : (off + len) / cs * cs;
        if (a < b) std::fill(model_.begin() + a, model_.begin() + b, std::byte{0});
        break;
      }
      case 8:
        what = "flush";
        ASSERT_TRUE(reactor_->BlockOn(dev_->Flush()).ok());
        break;
      case 9:
        what = "reopen";
        Reopen();
        break;
      case 11: {
        // Compressed whole clusters: text-like data, some clusters incompressible (stored
        // plain). Images with a data file cannot hold compressed clusters.
        const uint64_t cs = dev_->top().cluster_size();
        off = off / cs * cs;
        len = std::min<uint64_t>(size - off, cs * (1 + rng() % 4));
        std::vector<std::byte> data(len);
        const bool random = rng() % 4 == 0;
        for (uint64_t i = 0; i < len; ++i) {
          data[i] = random ? std::byte(rng()) : std::byte("qcow2kit "[i % 9] + (i / 4096) % 7);
        }
        what = "compressed write";
        Status s = reactor_->BlockOn(dev_->WriteCompressed(off, data));
        if (GetParam().name == "DataFile") {
          ASSERT_EQ(s.code(), ENOTSUP) << s.ToString();
          break;
        }
        ASSERT_TRUE(s.ok()) << s.ToString();
        std::copy(data.begin(), data.end(), model_.begin() + off);
        break;
      }
      case 10: {
        // Shrink or grow by up to half the starting size (grown ranges read as zeros).
        const uint64_t new_size =
            std::max<uint64_t>(512, (initial_size / 2 + rng() % initial_size) / 512 * 512);
        what = "resize to " + std::to_string(new_size);
        Status s = reactor_->BlockOn(dev_->Resize(new_size));
        ASSERT_TRUE(s.ok()) << s.ToString();
        ASSERT_EQ(dev_->size(), new_size);
        model_.resize(new_size, std::byte{0});
        off = std::min(off, new_size - 1);
        len = std::min(len, new_size - off);
        if (rng() % 2) Reopen();
        break;
      }
    }
    uint64_t lo = off >= 70000 ? off - 70000 : 0;
    CheckRange(lo, std::min<uint64_t>(model_.size() - lo, len + 140000), what);
  }
  CheckRange(0, model_.size(), "all steps");
  ASSERT_TRUE(reactor_->BlockOn(dev_->Close()).ok());
  dev_.reset();
  testing::ExpectImageMatchesModel(dir_, model_.data(), model_.size());
  // qemu-img map agrees on zero versus data: every range it reports as zero is zero.
  std::string out;
  int rc = testing::Run("cd " + dir_.path() + " && qemu-img map --output=json img.qcow2", &out);
  ASSERT_EQ(rc, 0) << out;
  auto map = nlohmann::json::parse(out, nullptr, false);
  ASSERT_TRUE(map.is_array()) << out;
  uint64_t covered = 0;
  for (const auto& e : map) {
    const uint64_t start = e["start"], length = e["length"];
    ASSERT_EQ(start, covered);
    covered += length;
    if (!e["zero"].get<bool>()) continue;
    for (uint64_t i = start; i < start + length; ++i) {
      ASSERT_EQ(model_[i], std::byte{0}) << "qemu-img map says zero at " << i;
    }
  }
  EXPECT_EQ(covered, model_.size());
  // A snapshot taken before the steps still reads as the image did then.
  if (testing::Run("cd " + dir_.path() + " && qemu-img snapshot -l img.qcow2 | grep -q snap") ==
      0) {
    rc = testing::Run("cd " + dir_.path() +
                          " && qemu-img convert -l snap -O raw img.qcow2 snap.raw && "
                          // qemu-img reads a snapshot at the image's current size
                          "n=$(stat -c %s snap.raw) && m=$(stat -c %s initial.raw) && "
                          "{ [ $n -lt $m ] || n=$m; } && cmp -n $n initial.raw snap.raw",
                      &out);
    EXPECT_EQ(rc, 0) << out;
  }
}

std::vector<ModelCase> Cases() {
  const std::string fill =
      "qemu-io -c 'write -P 0x5c 0 300k' -c 'write -P 0x7e 2M 64k' img.qcow2 >/dev/null";
  return {
      {"Default64k", {"qemu-img create -q -f qcow2 img.qcow2 8M", fill}, 0, 120},
      {"Clusters512",
       {"qemu-img create -q -f qcow2 -o cluster_size=512 img.qcow2 3M", fill},
       0,
       120},
      {"Clusters4kRefcount1",
       {"qemu-img create -q -f qcow2 -o cluster_size=4k,refcount_bits=1 img.qcow2 6M", fill},
       0,
       120},
      {"Clusters2MRefcount64",
       {"qemu-img create -q -f qcow2 -o cluster_size=2M,refcount_bits=64 img.qcow2 9M", fill},
       0,
       60},
      {"CompatV2", {"qemu-img create -q -f qcow2 -o compat=0.10 img.qcow2 5M", fill}, 0, 100},
      {"ExtendedL2",
       {"qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=64k img.qcow2 6M", fill},
       0,
       120},
      {"BackingChain",
       {"head -c 5000000 /dev/urandom > base.raw",
        "qemu-img create -q -f qcow2 -b base.raw -F raw img.qcow2 6M", fill},
       0,
       120},
      {"ExtendedL2WithBacking",
       {"qemu-img create -q -f qcow2 -o cluster_size=64k base.qcow2 6M",
        "qemu-io -c 'write -P 0x33 0 6M' base.qcow2 >/dev/null",
        "qemu-img create -q -f qcow2 -o extended_l2=on -b base.qcow2 -F qcow2 img.qcow2"},
       0,
       120},
      {"DataFile",
       {"qemu-img create -q -f qcow2 -o data_file=img.data img.qcow2 6M", fill},
       0,
       100},
      // Every cluster and L2 table shared with an internal snapshot: copy-on-write of both.
      {"InternalSnapshot",
       {"qemu-img create -q -f qcow2 -o cluster_size=4k img.qcow2 6M", fill,
        "qemu-img snapshot -c snap img.qcow2"},
       0,
       120},
      {"CompressedStart",
       {"head -c 3000000 /dev/urandom > r.raw && base64 r.raw | head -c 3000000 >> r.raw",
        "qemu-img convert -c -O qcow2 -f raw r.raw img.qcow2"},
       0,
       100},
  };
}

INSTANTIATE_TEST_SUITE_P(Images, ModelTest, ::testing::ValuesIn(Cases()),
                         [](const auto& info) { return info.param.name; });

}  // namespace
}  // namespace qcow2kit
