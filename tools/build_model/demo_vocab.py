"""Deterministic look-up vocabularies and head names for the demo model."""

from __future__ import annotations

import numpy as np

DEMO_SRCIDS = (111111, *range(757531, 757622))  # 92 heads
_NAMED_HEADS = {
    111111: "web_general",
    757531: "travel",
    757532: "medical",
    757533: "enterprise_info",
    757534: "short_video",
    757535: "education",
    757536: "automobile",
    757537: "real_estate",
    757538: "finance",
    757539: "legal",
    757540: "recipes",
    757541: "games",
    757542: "weather",
    757543: "maps_local",
    757544: "shopping",
    757545: "jobs",
}

_KNOWN_SITES = (
    "baidu.com", "zhidao.baidu.com", "baike.baidu.com", "tieba.baidu.com", "jingyan.baidu.com",
    "zhihu.com", "weibo.com", "qq.com", "news.qq.com", "sohu.com", "163.com", "sina.com.cn",
    "douban.com", "bilibili.com", "douyin.com", "kuaishou.com", "ixigua.com", "toutiao.com",
    "taobao.com", "tmall.com", "jd.com", "pinduoduo.com", "dianping.com", "meituan.com",
    "ctrip.com", "qunar.com", "mafengwo.cn", "fliggy.com", "12306.cn", "amap.com",
    "haodf.com", "dxy.cn", "120ask.com", "39.net", "xywy.com", "chunyuyisheng.com",
    "qcc.com", "tianyancha.com", "aiqicha.baidu.com", "gsxt.gov.cn",
    "autohome.com.cn", "dongchedi.com", "pcauto.com.cn", "lianjia.com", "ke.com", "anjuke.com",
    "eastmoney.com", "xueqiu.com", "10jqka.com.cn", "zhaopin.com", "51job.com", "liepin.com",
    "xiachufang.com", "meishichina.com", "4399.com", "17173.com", "weather.com.cn", "gov.cn",
    "chsi.com.cn", "cnki.net", "csdn.net", "github.com", "jianshu.com", "360doc.com",
)
_SITE_WORDS = (
    "zhongguo", "beijing", "shanghai", "guangzhou", "shenzhen", "hangzhou", "chengdu", "wuhan",
    "xian", "nanjing", "tianjin", "chongqing", "jiankang", "yiliao", "lvyou", "jiaoyu", "qiche",
    "fangchan", "jinrong", "falv", "meishi", "youxi", "tianqi", "gouwu", "zhaopin", "keji",
    "shuma", "tiyu", "yule", "junshi", "lishi", "wenhua", "nongye", "huagong", "jixie", "dianzi",
)
_TLDS = ("com", "cn", "com.cn", "net", "org.cn", "net.cn")

NER_TAGS = (
    "PER", "LOC", "ORG", "GPE", "TIME", "DATE", "PRODUCT", "BRAND", "MODEL", "EVENT", "WORK",
    "SONG", "MOVIE", "TV_SHOW", "GAME", "APP", "DISEASE", "SYMPTOM", "DRUG", "HOSPITAL",
    "DEPARTMENT", "FOOD", "DISH", "SCENIC_SPOT", "HOTEL", "COMPANY", "STOCK", "LAW", "SCHOOL",
    "MAJOR", "CAR", "CAR_SERIES", "PHONE", "STAR", "TEAM", "SPORT", "CURRENCY", "NUMBER",
)

INDUSTRIES = (
    "旅游", "医疗健康", "企业信息", "短视频", "教育培训", "汽车", "房产", "金融", "法律", "美食",
    "游戏", "天气", "本地生活", "电商购物", "招聘", "新闻资讯", "体育", "娱乐", "科技数码", "母婴",
    "家居", "农业", "工业制造", "政务", "文化艺术", "军事", "历史", "宠物", "美妆", "服饰",
    "交通出行", "通信", "能源", "物流", "安全", "环保", "公益", "宗教", "其他",
)


def demo_sites(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    sites = list(_KNOWN_SITES)
    seen = set(sites)
    while len(sites) < count:
        a, b = rng.choice(len(_SITE_WORDS), size=2, replace=False)
        name = f"{_SITE_WORDS[a]}{_SITE_WORDS[b]}{int(rng.integers(0, 100)) or ''}.{_TLDS[rng.integers(len(_TLDS))]}"
        if name not in seen:
            seen.add(name)
            sites.append(name)
    return sites


def head_name(srcid: int) -> str:
    return _NAMED_HEADS.get(srcid, f"vertical_{srcid}")
