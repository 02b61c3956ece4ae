// Concurrent writes on io_uring against a flat model: rounds of non-overlapping writes and
// write-zeroes all in flight at once, many landing in the same clusters (allocating,
// copy-on-write, preallocated and partly allocated subclustered clusters). No write may be
// lost, and at the end qemu-img check finds no errors or leaks and compare finds no
// difference.
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "qcow2kit/block.h"
#include "qcow2kit/image.h"
#include "qcow2kit/reactor.h"
#include "testing/test_util.h"

namespace qcow2kit {
namespace {

struct ConcurrencyCase {
  std::string name;
  std::vector<std::string> setup;  // makes img.qcow2 in the scratch dir
};
void PrintTo(const ConcurrencyCase& c, std::ostream* os) {
  *os << c.name;
}

class ConcurrencyTest : public ::testing::TestWithParam<ConcurrencyCase> {};

struct Op {
  uint64_t offset;
  uint64_t length;
  bool zeroes;
  std::vector<std::byte> data;
};

Task<void> RunOp(BlockDevice* dev, const Op* op, Status* out) {
  if (op->zeroes) {
    *out = co_await dev->WriteZeroes(op->offset, op->length, /*may_unmap=*/false);
  } else {
    *out = co_await dev->Write(op->offset, op->data);
  }
}

TEST_P(ConcurrencyTest, ConcurrentWritesAreNotLost) {
  testing::ScratchDir dir;
  for (const auto& cmd : GetParam().setup) testing::MustRun("cd " + dir.path() + " && " + cmd);
  testing::MustRun("cd " + dir.path() + " && qemu-img convert -O raw img.qcow2 model.raw");
  auto bytes = testing::ReadWholeFile(dir / "model.raw");
  std::vector<std::byte> model(reinterpret_cast<std::byte*>(bytes.data()),
                               reinterpret_cast<std::byte*>(bytes.data()) + bytes.size());
  const uint64_t size = model.size();

  auto reactor = Reactor::Create(EngineKind::kUring);
  ASSERT_TRUE(reactor.ok()) << "no io_uring: " << reactor.status().ToString();
  OpenOptions o;
  o.writable = true;
  auto img = (*reactor)->BlockOn(OpenImage(dir / "img.qcow2", o));
  ASSERT_TRUE(img.ok()) << img.status().ToString();
  auto dev_owner = std::make_unique<BlockDevice>(std::move(*img));
  BlockDevice& dev = *dev_owner;

  std::mt19937_64 rng(std::hash<std::string>{}(GetParam().name));
  const uint64_t lengths[] = {512, 4096, 6144, 65536, 100000};
  for (int round = 0; round < 40; ++round) {
    std::vector<Op> ops;
    // Offsets cluster in a 1 MiB window so that requests share clusters.
    const uint64_t window = rng() % (size - (1 << 20));
    for (int tries = 0; tries < 200 && ops.size() < 24; ++tries) {
      Op op;
      op.length = lengths[rng() % 5];
      op.offset = window + (rng() % ((1 << 20) - op.length)) / 512 * 512;
      bool overlaps = false;
      for (const Op& other : ops) {
        overlaps |= op.offset < other.offset + other.length && other.offset < op.offset + op.length;
      }
      if (overlaps) continue;
      op.zeroes = rng() % 6 == 0;
      if (!op.zeroes) op.data.assign(op.length, std::byte(1 + (round * 24 + ops.size()) % 250));
      ops.push_back(std::move(op));
    }
    std::vector<Status> results(ops.size());
    for (size_t i = 0; i < ops.size(); ++i) (*reactor)->Spawn(RunOp(&dev, &ops[i], &results[i]));
    (*reactor)->RunUntilIdle();
    for (size_t i = 0; i < ops.size(); ++i) {
      ASSERT_TRUE(results[i].ok()) << results[i].ToString();
      const Op& op = ops[i];
      if (op.zeroes) {
        std::fill(model.begin() + op.offset, model.begin() + op.offset + op.length, std::byte{0});
      } else {
        std::copy(op.data.begin(), op.data.end(), model.begin() + op.offset);
      }
    }
    if (round % 10 == 9) {
      ASSERT_TRUE((*reactor)->BlockOn(dev.Flush()).ok());
    }
    std::vector<std::byte> got(size);
    Status s = (*reactor)->BlockOn(dev.Read(0, got));
    ASSERT_TRUE(s.ok()) << s.ToString();
    for (uint64_t i = 0; i < size; ++i) {
      ASSERT_EQ(got[i], model[i]) << "guest offset " << i << " after round " << round;
    }
  }
  Status s = (*reactor)->BlockOn(dev.Close());
  ASSERT_TRUE(s.ok()) << s.ToString();
  dev_owner.reset();  // closes the files, dropping the image locks qemu-img below would meet
  testing::ExpectImageMatchesModel(dir, model.data(), model.size());
}

std::vector<ConcurrencyCase> Cases() {
  // Partly written clusters, preallocated zero clusters (write -z keeps the allocation) and
  // reserved-but-unwritten subclusters.
  const std::string fill =
      "qemu-io -c 'write -P 0x5c 0 300k' -c 'write -P 0x6d 8k 4k' -c 'write -z 1M 256k' "
      "-c 'write -P 0x7e 2M 64k' -c 'write -z 2M 32k' img.qcow2 >/dev/null";
  return {
      {"Default64k", {"qemu-img create -q -f qcow2 img.qcow2 4M", fill}},
      {"Clusters4k", {"qemu-img create -q -f qcow2 -o cluster_size=4k img.qcow2 4M", fill}},
      {"ExtendedL2",
       {"qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=128k img.qcow2 4M", fill}},
      {"ExtendedL2WithBacking",
       {"qemu-img create -q -f qcow2 base.qcow2 4M",
        "qemu-io -c 'write -P 0x33 0 4M' base.qcow2 >/dev/null",
        "qemu-img create -q -f qcow2 -o extended_l2=on -b base.qcow2 -F qcow2 img.qcow2", fill}},
      {"PreallocatedMetadata",
       {"qemu-img create -q -f qcow2 -o preallocation=metadata img.qcow2 4M", fill}},
      {"DataFile", {"qemu-img create -q -f qcow2 -o data_file=img.data img.qcow2 4M", fill}},
  };
}

INSTANTIATE_TEST_SUITE_P(Images, ConcurrencyTest, ::testing::ValuesIn(Cases()),
                         [](const auto& info) { return info.param.name; });

}  // namespace
}  // namespace qcow2kit
