#include "tools/qemu_json.h"

#include "gtest/gtest.h"

namespace qcow2kit::tools {
namespace {

std::vector<std::string> Keys(const Json& object) {
  std::vector<std::string> keys;
  for (auto& [key, value] : QdictOrder(object)) keys.push_back(*key);
  return keys;
}

TEST(QemuJsonTest, ImageInfoKeysInQemuImgOrder) {
  // QAPI ImageInfo members in schema order; the expected order is qemu-img 7.2's output.
  Json info = Json::object();
  for (const char* k : {"filename", "format", "dirty-flag", "actual-size", "virtual-size",
                        "cluster-size", "backing-filename", "full-backing-filename",
                        "backing-filename-format", "snapshots", "format-specific"}) {
    info[k] = 0;
  }
  EXPECT_EQ(Keys(info), (std::vector<std::string>{
                            "backing-filename-format", "snapshots", "virtual-size", "filename",
                            "cluster-size", "format", "actual-size", "format-specific",
                            "full-backing-filename", "backing-filename", "dirty-flag"}));
}

TEST(QemuJsonTest, SnapshotAndQcow2KeysInQemuImgOrder) {
  Json snap = Json::object();
  for (const char* k : {"id", "name", "vm-state-size", "date-sec", "date-nsec", "vm-clock-sec",
                        "vm-clock-nsec", "icount"}) {
    snap[k] = 0;
  }
  EXPECT_EQ(Keys(snap),
            (std::vector<std::string>{"icount", "vm-clock-nsec", "name", "date-sec", "date-nsec",
                                      "vm-clock-sec", "id", "vm-state-size"}));
  Json q = Json::object();
  for (const char* k : {"compat", "data-file", "data-file-raw", "extended-l2", "lazy-refcounts",
                        "corrupt", "refcount-bits", "bitmaps", "compression-type"}) {
    q[k] = 0;
  }
  EXPECT_EQ(Keys(q), (std::vector<std::string>{"compat", "compression-type", "lazy-refcounts",
                                               "bitmaps", "refcount-bits", "data-file",
                                               "data-file-raw", "corrupt", "extended-l2"}));
}

TEST(QemuJsonTest, CollidingKeysComeNewestFirst) {
  // Find two keys in one bucket; QEMU inserts at the head of the bucket's list.
  std::string a = "k0", b;
  for (int i = 1; b.empty(); ++i) {
    std::string k = "k" + std::to_string(i);
    if (QdictBucket(k) == QdictBucket(a)) b = k;
  }
  Json o = Json::object();
  o[a] = 1;
  o[b] = 2;
  EXPECT_EQ(Keys(o), (std::vector<std::string>{b, a}));
}

TEST(QemuJsonTest, PrettyPrintsLikeQemu) {
  Json v = Json::object();
  v["type"] = "qcow2";
  Json flags = Json::array();
  v["data"] = {{"flags", flags}, {"n", 16}, {"b", true}, {"list", {"auto"}}};
  EXPECT_EQ(QemuJsonPretty(v),
            "{\n"
            "    \"type\": \"qcow2\",\n"
            "    \"data\": {\n"
            "        \"flags\": [\n"
            "        ],\n"
            "        \"list\": [\n"
            "            \"auto\"\n"
            "        ],\n"
            "        \"n\": 16,\n"
            "        \"b\": true\n"
            "    }\n"
            "}");
  EXPECT_EQ(QemuJsonPretty(Json::object()), "{\n}");
  EXPECT_EQ(QemuJsonPretty(Json::array()), "[\n]");
}

TEST(QemuJsonTest, QuotesLikeQemu) {
  EXPECT_EQ(QemuJsonQuote("a\"b\\c\n\t"), "\"a\\\"b\\\\c\\n\\t\"");
  EXPECT_EQ(QemuJsonQuote(std::string("\x01\x7f", 2)), "\"\\u0001\\u007F\"");
  EXPECT_EQ(QemuJsonQuote("\xc3\xa9"), "\"\\u00E9\"");                 // U+00E9
  EXPECT_EQ(QemuJsonQuote("\xf0\x9f\x98\x80"), "\"\\uD83D\\uDE00\"");  // U+1F600
  EXPECT_EQ(QemuJsonQuote("\xff"), "\"\\uFFFD\"");                     // not UTF-8
}

TEST(QemuJsonTest, HumanDumpLikeQemuImg) {
  Json bitmaps = Json::array();
  bitmaps.push_back({{"name", "b0"}, {"granularity", 65536}, {"flags", {"auto"}}});
  bitmaps.push_back({{"name", "b1"}, {"granularity", 524288}, {"flags", Json::array()}});
  Json d = Json::object();
  d["compat"] = "1.1";
  d["lazy-refcounts"] = false;
  d["bitmaps"] = bitmaps;
  EXPECT_EQ(QemuHumanDump(d, 1),
            "    compat: 1.1\n"
            "    lazy refcounts: false\n"
            "    bitmaps:\n"
            "        [0]:\n"
            "            flags:\n"
            "                [0]: auto\n"
            "            name: b0\n"
            "            granularity: 65536\n"
            "        [1]:\n"
            "            flags:\n"
            "            name: b1\n"
            "            granularity: 524288\n");
}

TEST(QemuJsonTest, JsonDumpSurvivesInvalidUtf8) {
  Json v = {{"name", std::string("a\xff")}};
  EXPECT_NO_THROW(JsonDump(v));
}

}  // namespace
}  // namespace qcow2kit::tools
