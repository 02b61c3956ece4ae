#include "tools/info.h"

#include "gtest/gtest.h"

namespace qcow2kit::tools {
namespace {

TEST(InfoTest, HumanLayoutLikeQemuImg) {
  Json info = Json::object();
  info["filename"] = "sub/top.qcow2";
  info["format"] = "qcow2";
  info["dirty-flag"] = true;
  info["actual-size"] = 200704;
  info["virtual-size"] = 67108864;
  info["cluster-size"] = 65536;
  info["backing-filename"] = "../base.qcow2";
  info["full-backing-filename"] = "sub/../base.qcow2";
  info["backing-filename-format"] = "qcow2";
  Json data = Json::object();
  data["compat"] = "1.1";
  data["lazy-refcounts"] = true;
  data["refcount-bits"] = 16;
  data["compression-type"] = "zlib";
  info["format-specific"] = {{"type", "qcow2"}, {"data", data}};
  EXPECT_EQ(ImageInfoHuman(info),
            "image: sub/top.qcow2\n"
            "file format: qcow2\n"
            "virtual size: 64 MiB (67108864 bytes)\n"
            "disk size: 196 KiB\n"
            "cluster_size: 65536\n"
            "cleanly shut down: no\n"
            "backing file: ../base.qcow2 (actual path: sub/../base.qcow2)\n"
            "backing file format: qcow2\n"
            "Format specific information:\n"
            "    compat: 1.1\n"
            "    compression type: zlib\n"
            "    lazy refcounts: true\n"
            "    refcount bits: 16\n");
}

TEST(InfoTest, SnapshotTableColumns) {
  EXPECT_EQ(SnapshotTableRow(Json()),
            "ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT");
  Json s = Json::object();
  s["id"] = "1";
  s["name"] = "s1";
  s["vm-state-size"] = 0;
  s["date-sec"] = 0;
  s["date-nsec"] = 0;
  s["vm-clock-sec"] = 3723;
  s["vm-clock-nsec"] = 500000000;
  const std::string row = SnapshotTableRow(s);
  // The date is local time; everything around it has fixed columns.
  ASSERT_EQ(row.size(), 79u);
  EXPECT_EQ(row.substr(0, 35), "1         s1                    0 B");
  EXPECT_EQ(row.substr(55), " 01:02:03.500" + std::string(11, ' '));
}

}  // namespace
}  // namespace qcow2kit::tools
